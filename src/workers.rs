//! Background workers: one poll worker and one push worker per connector instance.
//!
//! A poll worker waits for a [`Trigger`] (its interval or cron tick, a scheduled full
//! resync, a webhook arrival, an operator's resync) and reads pages until the source has
//! nothing more, applying each page with its cursor in one transaction. A push worker
//! drains its connector's outbox in batches, holding a partial batch briefly (longer while
//! a burst is filling it, see [`Linger`]), and records every outcome. Both back off on
//! errors (the one retry module) and stop between steps when the daemon shuts down; an
//! unfinished push stays in the outbox.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use optout_core::retry::Backoff;
use optout_core::{Connector, ConnectorError, Cursor, Page, Timestamp};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::{ConnectorOutcome, Metrics, ScopeDecision, SourceResult};
use crate::reconcile::{ApplyReport, Engine, Takes};

/// Why a poll worker should poll now.
#[derive(Debug)]
pub enum Trigger {
    /// Read what changed since the cursor (a tick, a webhook, `resync`).
    Incremental { done: Option<mpsc::Sender<String>> },
    /// Re-read everything from the beginning and repair drift (`resync --full`).
    Full { done: Option<mpsc::Sender<String>> },
}

/// When a poll worker polls on its own.
#[derive(Clone, Debug)]
pub enum Schedule {
    Interval(Duration),
    Cron(Box<cron::Schedule>),
    /// Only when triggered (WhatsApp: each webhook wakes it).
    OnDemand,
}

impl Schedule {
    pub fn cron(expr: &str) -> Option<Schedule> {
        cron::Schedule::from_str(expr)
            .ok()
            .map(|s| Schedule::Cron(Box::new(s)))
    }

    /// Time until the next tick.
    fn next(&self) -> Option<Duration> {
        match self {
            Schedule::Interval(d) => Some(*d),
            Schedule::Cron(c) => until_next(c),
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
        for connector in report.enqueued.keys() {
            if let Some(w) = self.push_wakers.get(connector) {
                w.notify_one();
            }
        }
    }
}

/// Runs blocking store work off the async threads (sled flushes to disk).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store task panicked")
}

fn record_error(
    ctx: &WorkerContext,
    status: &StatusCell,
    name: &str,
    what: &str,
    e: &ConnectorError,
) {
    ctx.metrics
        .poll_errors
        .get_or_create(&ConnectorOutcome {
            connector: name.to_string(),
            outcome: format!("{what}_{}", e.kind()),
        })
        .inc();
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    s.healthy = false;
    s.last_error = Some(format!("{what}: {e}"));
    if what == "poll" {
        s.poll_errors += 1;
    } else {
        s.push_errors += 1;
    }
    if e.is_alarm() {
        s.alarm = Some(e.to_string());
        ctx.metrics
            .alarm
            .get_or_create(&Metrics::connector(name))
            .set(1);
        tracing::error!(connector = %name, error = %e, "{what} failed: operator action needed");
    } else {
        tracing::warn!(connector = %name, error = %e, "{what} failed; will retry");
    }
}

fn clear_alarm(ctx: &WorkerContext, status: &StatusCell, name: &str) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    s.healthy = true;
    if s.alarm.take().is_some() {
        ctx.metrics
            .alarm
            .get_or_create(&Metrics::connector(name))
            .set(0);
        tracing::info!(connector = %name, "connector recovered");
    }
}

/// Called after each page is stored (WhatsApp: drop inbox entries up to the cursor).
pub type PageHook = Arc<dyn Fn(&Page) + Send + Sync>;

/// What a poll worker needs besides its connector.
pub struct PollSettings {
    pub name: String,
    pub status: StatusCell,
    pub triggers: mpsc::Receiver<Trigger>,
    pub schedule: Schedule,
    pub full_resync: Option<Schedule>,
    pub after_page: Option<PageHook>,
}

/// The poll worker of one connector instance.
pub async fn poll_worker<C: Connector + ?Sized>(
    connector: Arc<C>,
    ctx: Arc<WorkerContext>,
    settings: PollSettings,
) {
    let PollSettings {
        name,
        status,
        mut triggers,
        schedule,
        full_resync,
        after_page,
    } = settings;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(300));
    // Poll once at start: a first run reads everything; later runs catch up.
    let mut pending: Option<Trigger> = Some(Trigger::Incremental { done: None });
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let trigger = match pending.take() {
            Some(t) => t,
            None => {
                let tick = retry_at
                    .map(|t| t.saturating_duration_since(tokio::time::Instant::now()))
                    .or_else(|| schedule.next());
                let full = full_resync.as_ref().and_then(Schedule::next);
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return,
                    t = triggers.recv() => match t { Some(t) => t, None => return },
                    _ = sleep_opt(tick) => Trigger::Incremental { done: None },
                    _ = sleep_opt(full) => Trigger::Full { done: None },
                }
            }
        };
        retry_at = None;
        let (full, done) = match trigger {
            Trigger::Incremental { done } => (false, done),
            Trigger::Full { done } => (true, done),
        };
        if full {
            // A full resync also gives rejected pushes another chance.
            let engine = ctx.engine.clone();
            let n = name.clone();
            if let Ok(k) =
                blocking(move || engine.retry_dead_letters(Some(&n), Timestamp::now())).await
                && k > 0
            {
                tracing::info!(connector = %name, count = k, "dead letters re-queued by full resync");
            }
            tracing::info!(connector = %name, "full resync started");
        }
        let mut cursor = if full {
            None
        } else {
            ctx.engine.store().cursor(&name).ok().flatten().map(Cursor)
        };
        let mut pages = 0u64;
        let mut records = 0u64;
        loop {
            if ctx.cancel.is_cancelled() {
                return;
            }
            let result = tokio::select! {
                r = connector.poll(cursor.as_ref()) => r,
                _ = ctx.cancel.cancelled() => return,
            };
            match result {
                Ok(page) => {
                    backoff.reset();
                    let engine = ctx.engine.clone();
                    let n = name.clone();
                    let obs = page.observations.clone();
                    let c = page.cursor.0.clone();
                    let applied =
                        blocking(move || engine.apply_page(&n, &obs, Some(&c), Timestamp::now()))
                            .await;
                    match applied {
                        Ok(report) => {
                            ctx.after_apply(&name, &report);
                            if let Some(hook) = &after_page {
                                hook(&page);
                            }
                        }
                        Err(e) => {
                            tracing::error!(connector = %name, error = %e, "could not store a page; will re-read it");
                            retry_at = Some(tokio::time::Instant::now() + backoff.next_delay(None));
                            break;
                        }
                    }
                    pages += 1;
                    records += page.observations.len() as u64;
                    cursor = Some(page.cursor.clone());
                    {
                        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                        s.cursor = Some(page.cursor.0.clone());
                        if full || page.more {
                            let progress = match page.progress {
                                Some(p) => format!(
                                    "{} of {} records",
                                    p.done,
                                    p.total.map(|t| t.to_string()).unwrap_or("?".into())
                                ),
                                None => format!("{records} records in {pages} pages"),
                            };
                            s.resync = Some(progress.clone());
                            if let Some(tx) = &done {
                                let _ = tx.try_send(format!("{name}: {progress}"));
                            }
                        }
                    }
                    if !page.more {
                        {
                            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                            s.last_poll_ok = Some(Timestamp::now());
                            s.resync = None;
                        }
                        clear_alarm(&ctx, &status, &name);
                        if full {
                            tracing::info!(connector = %name, pages, records, "full resync finished");
                        }
                        if let Some(tx) = &done {
                            let _ = tx
                                .send(format!(
                                    "{name}: done ({records} records read in {pages} pages)"
                                ))
                                .await;
                        }
                        break;
                    }
                }
                Err(e) => {
                    record_error(&ctx, &status, &name, "poll", &e);
                    let delay = backoff.next_delay(e.retry_after());
                    if let Some(tx) = &done {
                        let _ = tx
                            .send(format!(
                                "{name}: poll failed ({e}); retrying in {:.1}s",
                                delay.as_secs_f64()
                            ))
                            .await;
                    }
                    if full {
                        // Keep the full resync going from where it stopped.
                        let _ = done;
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = ctx.cancel.cancelled() => return,
                        }
                    }
                    retry_at = Some(tokio::time::Instant::now() + delay);
                    break;
                }
            }
        }
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// How long a push worker holds a partial batch (`push_linger`, `push_max_linger`).
///
/// Every request counts against the target's rate limit (HubSpot's smallest portals allow
/// 100 per 10 s), so a burst of opt-outs should go out in full batches; a lone opt-out
/// should not wait for company. A partial batch is held until its oldest entry has waited
/// `min`; then, judging by how fast its entries came, it is held on only if the rest of a
/// full batch should arrive before the oldest has waited `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linger {
    pub min: Duration,
    pub max: Duration,
}

impl Linger {
    /// `n` entries are due (at most `batch`), the oldest for `waited`: how much longer to
    /// hold them, or `None` to send now.
    pub fn hold(&self, n: usize, batch: usize, waited: Duration) -> Option<Duration> {
        if n == 0 || n >= batch || self.min.is_zero() {
            return None;
        }
        if waited < self.min {
            return Some(self.min - waited);
        }
        let rate = n as f64 / waited.as_secs_f64();
        let fill = Duration::from_secs_f64((batch - n) as f64 / rate);
        // Look again no sooner than `min` so that the check does not spin.
        (waited + fill <= self.max).then(|| fill.max(self.min).min(self.max - waited))
    }
}

/// The push worker of one connector instance.
pub async fn push_worker<C: Connector + ?Sized>(
    name: String,
    connector: Arc<C>,
    ctx: Arc<WorkerContext>,
    status: StatusCell,
    takes: Takes,
    linger: Linger,
) {
    let wake = ctx.push_wakers.get(&name).cloned().unwrap_or_default();
    let mut held_since: Option<tokio::time::Instant> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(300));
    let max = connector.max_batch().max(1);
    loop {
        if ctx.cancel.is_cancelled() {
            return;
        }
        let store = ctx.engine.store().clone();
        let due = match store.due_pushes(&name, Timestamp::now(), max) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(connector = %name, error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        if due.is_empty() {
            held_since = None;
            let next = store
                .next_due(&name)
                .ok()
                .flatten()
                .map(|t| t.since(Timestamp::now()).max(Duration::from_millis(1)));
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = sleep_opt(next) => {}
            }
            continue;
        }
        // A partial batch waits for more while that is likely to fill it; the monotonic
        // `held_since` bounds the wait even if the wall clock steps.
        let oldest = due.iter().map(|(_, e)| e.not_before).min();
        let held = held_since
            .get_or_insert_with(tokio::time::Instant::now)
            .elapsed();
        let waited = oldest.map_or(held, |t| Timestamp::now().since(t).max(held));
        if let Some(wait) = linger.hold(due.len(), max, waited) {
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        held_since = None;
        let keys: Vec<(String, u64)> = due.iter().map(|(k, e)| (k.clone(), e.version)).collect();
        if takes == Takes::Replies {
            let engine = ctx.engine.clone();
            let (n, k) = (name.clone(), keys.clone());
            if let Err(e) = blocking(move || engine.mark_in_flight(&n, &k)).await {
                tracing::error!(connector = %name, error = %e, "cannot mark replies in flight; not sending");
                tokio::time::sleep(backoff.next_delay(None)).await;
                continue;
            }
        }
        let items: Vec<_> = due.iter().map(|(_, e)| e.item.clone()).collect();
        let result = connector.push(&items).await;
        let now = Timestamp::now();
        let engine = ctx.engine.clone();
        let n = name.clone();
        match result {
            Ok(outcomes) if outcomes.len() == items.len() => {
                // A batch in which anything went through shows the target works: items
                // to retry start again from the shortest delay (or their Retry-After).
                // Only batches that made no progress at all grow the back-off.
                let progressed = outcomes
                    .iter()
                    .any(|o| !matches!(o, optout_core::PushOutcome::RetryLater { .. }));
                if progressed {
                    backoff.reset();
                }
                let delay = backoff.next_delay(None);
                let results: Vec<_> = keys
                    .iter()
                    .cloned()
                    .zip(outcomes)
                    .map(|((k, v), o)| (k, v, o))
                    .collect();
                for (_, _, o) in &results {
                    let outcome = match o {
                        optout_core::PushOutcome::Done => "done",
                        optout_core::PushOutcome::RetryLater { .. } => "retry",
                        optout_core::PushOutcome::Rejected { .. } => "rejected",
                    };
                    ctx.metrics
                        .pushes
                        .get_or_create(&ConnectorOutcome {
                            connector: name.clone(),
                            outcome: outcome.into(),
                        })
                        .inc();
                }
                for (item, (_, _, o)) in items.iter().zip(&results) {
                    match o {
                        optout_core::PushOutcome::Done => {
                            ctx.metrics
                                .observe_propagation(&name, now.since(item.changed_at));
                            tracing::info!(connector = %name, subject = %item.subject, record = %item.record, status = %item.status, "push done");
                        }
                        optout_core::PushOutcome::Rejected { reason } => {
                            tracing::error!(connector = %name, subject = %item.subject, record = %item.record, status = %item.status, reason = %reason, "push rejected: dead letter");
                        }
                        optout_core::PushOutcome::RetryLater { reason, .. } => {
                            tracing::warn!(connector = %name, subject = %item.subject, record = %item.record, reason = %reason, "push will be retried");
                        }
                    }
                }
                match blocking(move || engine.complete_pushes(&n, &results, delay, now)).await {
                    Ok(_) => {
                        status
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .last_push_ok = Some(now);
                        clear_alarm(&ctx, &status, &name);
                    }
                    Err(e) => {
                        tracing::error!(connector = %name, error = %e, "cannot record push outcomes; they will be pushed again")
                    }
                }
            }
            Ok(outcomes) => {
                let e = ConnectorError::Transient(format!(
                    "connector returned {} outcomes for {} items",
                    outcomes.len(),
                    items.len()
                ));
                record_error(&ctx, &status, &name, "push", &e);
                let delay = backoff.next_delay(None);
                let msg = e.to_string();
                let _ = blocking(move || engine.defer_pushes(&n, &keys, &msg, delay, now)).await;
            }
            Err(e) => {
                record_error(&ctx, &status, &name, "push", &e);
                let delay = backoff.next_delay(e.retry_after());
                let msg = e.to_string();
                if let Err(se) =
                    blocking(move || engine.defer_pushes(&n, &keys, &msg, delay, now)).await
                {
                    tracing::error!(connector = %name, error = %se, "cannot defer pushes");
                }
            }
        }
    }
}

/// How often each connector's own health check runs.
const HEALTH_INTERVAL: Duration = Duration::from_secs(300);

/// Runs the connector's health check at start and every few minutes, for `status`.
pub async fn health_worker<C: Connector + ?Sized>(
    name: String,
    connector: Arc<C>,
    status: StatusCell,
    cancel: CancellationToken,
) {
    loop {
        let h = tokio::select! {
            h = connector.health() => h,
            _ = cancel.cancelled() => return,
        };
        if !h.ok {
            tracing::warn!(connector = %name, detail = %h.detail, "health check failed");
        }
        status.lock().unwrap_or_else(|p| p.into_inner()).health = Some(h);
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn linger() -> Linger {
        Linger {
            min: 10 * MS,
            max: 250 * MS,
        }
    }

    #[test]
    fn a_lone_entry_waits_only_the_minimum() {
        assert_eq!(linger().hold(1, 100, Duration::ZERO), Some(10 * MS));
        assert_eq!(linger().hold(1, 100, 4 * MS), Some(6 * MS));
        // One entry in 10 ms would take a second to fill the batch: send.
        assert_eq!(linger().hold(1, 100, 10 * MS), None);
        assert_eq!(linger().hold(3, 100, 40 * MS), None);
    }

    #[test]
    fn a_burst_is_held_until_it_should_fill_the_batch() {
        // 26 in 10 ms: the other 74 should come in about 28 ms.
        let wait = linger().hold(26, 100, 10 * MS).unwrap();
        assert!((28 * MS..=29 * MS).contains(&wait), "{wait:?}");
        // Nearly full: look again after the minimum, not in a spin.
        assert_eq!(linger().hold(99, 100, 40 * MS), Some(10 * MS));
        // Never beyond the maximum.
        assert_eq!(linger().hold(99, 100, 245 * MS), Some(5 * MS));
        assert_eq!(linger().hold(99, 100, 250 * MS), None);
        assert_eq!(linger().hold(60, 100, 200 * MS), None);
        // Held past the maximum (a slow outbox read): send, whatever the rate.
        assert_eq!(linger().hold(99, 100, 400 * MS), None);
        let equal = Linger {
            min: 250 * MS,
            max: 250 * MS,
        };
        assert_eq!(equal.hold(10, 100, 260 * MS), None);
    }

    #[test]
    fn full_batches_and_zero_linger_go_at_once() {
        assert_eq!(linger().hold(100, 100, Duration::ZERO), None);
        let none = Linger {
            min: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(none.hold(1, 100, Duration::ZERO), None);
        assert_eq!(linger().hold(0, 100, Duration::ZERO), None);
    }
}
