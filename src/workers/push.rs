//! The push worker: drains a connector's outbox in batches.
//!
//! Each step reads the due entries (at most a batch). With none, the worker waits for the
//! earliest entry to become due or for a wake-up (new entries). A partial batch is held
//! briefly, longer while a burst is filling it ([`Linger`]). Replies that must never be
//! sent twice are marked in flight first. Every outcome is recorded per entry version,
//! so a newer value enqueued meanwhile is never lost; a batch that failed as a whole is
//! deferred by the back-off. A push under way when the daemon stops is finished and
//! recorded; what was not sent stays in the outbox.

use std::sync::Arc;
use std::time::Duration;

use optout_core::{Connector, ConnectorError, PushItem, PushOutcome, Timestamp};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::runner::{Failure, Next, Step, StepCx, Worker};
use super::{StatusCell, WorkerContext, blocking, sleep_opt};
use crate::metrics::ConnectorOutcome;
use crate::reconcile::Takes;
use crate::store::OutboxEntry;

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
pub struct Push<C: Connector + ?Sized> {
    name: String,
    connector: Arc<C>,
    ctx: Arc<WorkerContext>,
    status: StatusCell,
    takes: Takes,
    linger: Linger,
    max: usize,
    wake: Arc<Notify>,
    /// Since when the current partial batch has been held (monotonic, so a step of the
    /// wall clock cannot stretch the hold).
    held_since: Option<Instant>,
    /// When the earliest pending entry becomes due, while idle.
    next_due: Option<Duration>,
    /// The keys and versions of a batch that failed as a whole, to defer.
    failed: Option<Vec<(String, u64)>>,
}

impl<C: Connector + ?Sized> Push<C> {
    pub fn new(
        name: String,
        connector: Arc<C>,
        ctx: Arc<WorkerContext>,
        status: StatusCell,
        takes: Takes,
        linger: Linger,
    ) -> Self {
        let wake = ctx.push_wakers.get(&name).cloned().unwrap_or_default();
        let max = connector.max_batch().max(1);
        Push {
            name,
            connector,
            ctx,
            status,
            takes,
            linger,
            max,
            wake,
            held_since: None,
            next_due: None,
            failed: None,
        }
    }

    /// The due entries, oldest key first, at most a batch; an unreadable outbox counts as
    /// empty (logged).
    async fn due(&self) -> Vec<(String, OutboxEntry)> {
        let (store, name, max) = (self.ctx.engine.store().clone(), self.name.clone(), self.max);
        match blocking(move || store.due_pushes(&name, Timestamp::now(), max)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(connector = %self.name, error = %e, "cannot read the outbox");
                Vec::new()
            }
        }
    }

    /// How long until the earliest pending entry is due, if any.
    async fn until_next_due(&self) -> Option<Duration> {
        let (store, name) = (self.ctx.engine.store().clone(), self.name.clone());
        let next = blocking(move || store.next_due(&name)).await.ok().flatten();
        next.map(|t| t.since(Timestamp::now()).max(Duration::from_millis(1)))
    }

    /// How much longer to hold a partial batch of `due`, if at all.
    fn hold(&mut self, due: &[(String, OutboxEntry)]) -> Option<Duration> {
        let oldest = due.iter().map(|(_, e)| e.not_before).min();
        let held = self.held_since.get_or_insert_with(Instant::now).elapsed();
        let waited = oldest.map_or(held, |t| Timestamp::now().since(t).max(held));
        self.linger.hold(due.len(), self.max, waited)
    }

    /// Records a batch's outcomes (one per item). Returns whether they were stored.
    async fn complete(
        &self,
        cx: &mut StepCx,
        keys: &[(String, u64)],
        items: &[PushItem],
        outcomes: Vec<PushOutcome>,
    ) -> bool {
        // A batch in which anything went through shows the target works: items to retry
        // start again from the shortest delay (or their Retry-After). Only batches that
        // made no progress at all grow the back-off.
        let progressed = outcomes
            .iter()
            .any(|o| !matches!(o, PushOutcome::RetryLater { .. }));
        if progressed {
            cx.backoff.reset();
        }
        let delay = cx.backoff.next_delay(None);
        let now = Timestamp::now();
        self.observe(items, &outcomes, now);
        let results: Vec<_> = keys
            .iter()
            .cloned()
            .zip(outcomes)
            .map(|((k, v), o)| (k, v, o))
            .collect();
        let (engine, n) = (self.ctx.engine.clone(), self.name.clone());
        match blocking(move || engine.complete_pushes(&n, &results, delay, now)).await {
            Ok(_) => {
                self.status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_push_ok = Some(now);
                true
            }
            Err(e) => {
                tracing::error!(connector = %self.name, error = %e, "cannot record push outcomes; they will be pushed again");
                false
            }
        }
    }

    /// Metrics and a log line per outcome.
    fn observe(&self, items: &[PushItem], outcomes: &[PushOutcome], now: Timestamp) {
        let name = &self.name;
        for (item, o) in items.iter().zip(outcomes) {
            let outcome = match o {
                PushOutcome::Done => "done",
                PushOutcome::RetryLater { .. } => "retry",
                PushOutcome::Rejected { .. } => "rejected",
            };
            self.ctx
                .metrics
                .pushes
                .get_or_create(&ConnectorOutcome {
                    connector: name.clone(),
                    outcome: outcome.into(),
                })
                .inc();
            match o {
                PushOutcome::Done => {
                    self.ctx
                        .metrics
                        .observe_propagation(name, now.since(item.changed_at));
                    tracing::info!(connector = %name, subject = %item.subject, record = %item.record, status = %item.status, "push done");
                }
                PushOutcome::Rejected { reason } => {
                    tracing::error!(connector = %name, subject = %item.subject, record = %item.record, status = %item.status, reason = %reason, "push rejected: dead letter");
                }
                PushOutcome::RetryLater { reason, .. } => {
                    tracing::warn!(connector = %name, subject = %item.subject, record = %item.record, reason = %reason, "push will be retried");
                }
            }
        }
    }
}

impl<C: Connector + ?Sized> Worker for Push<C> {
    fn name(&self) -> &str {
        &self.name
    }

    fn what(&self) -> &'static str {
        "push"
    }

    /// Sends one batch of due entries, or says how long to hold or wait.
    async fn step(&mut self, cx: &mut StepCx) -> Result<Step, Failure> {
        let due = self.due().await;
        if due.is_empty() {
            self.held_since = None;
            self.next_due = self.until_next_due().await;
            return Ok(Step::from(Next::Idle));
        }
        if let Some(wait) = self.hold(&due) {
            return Ok(Step::from(Next::After(wait)));
        }
        self.held_since = None;
        let keys: Vec<(String, u64)> = due.iter().map(|(k, e)| (k.clone(), e.version)).collect();
        if self.takes == Takes::Replies {
            let (engine, n, k) = (self.ctx.engine.clone(), self.name.clone(), keys.clone());
            blocking(move || engine.mark_in_flight(&n, &k))
                .await
                .map_err(|error| Failure::Store {
                    doing: "cannot mark replies in flight; not sending",
                    error,
                })?;
        }
        let items: Vec<PushItem> = due.into_iter().map(|(_, e)| e.item).collect();
        match self.connector.push(&items).await {
            Ok(outcomes) if outcomes.len() == items.len() => {
                let stored = self.complete(cx, &keys, &items, outcomes).await;
                // Part of the batch refused for the configuration (one object's field),
                // the rest written: still an alarm, until the connector says it is over.
                if let Some(why) = self.connector.config_alarm() {
                    let book = self.ctx.bookkeeping(&self.status);
                    book.record_error(&self.name, "push", &ConnectorError::Config(why));
                    return Ok(Step::from(Next::Now));
                }
                Ok(Step {
                    next: Next::Now,
                    recovered: stored,
                })
            }
            Ok(outcomes) => {
                self.failed = Some(keys);
                Err(Failure::Connector(ConnectorError::Transient(format!(
                    "connector returned {} outcomes for {} items",
                    outcomes.len(),
                    items.len()
                ))))
            }
            Err(e) => {
                self.failed = Some(keys);
                Err(Failure::Connector(e))
            }
        }
    }

    /// Waits for new entries or for the earliest pending one to become due.
    async fn wait(&mut self) -> Next {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = sleep_opt(self.next_due) => {}
        }
        Next::Now
    }

    /// A batch that failed as a whole waits the back-off in the outbox (and the worker
    /// moves on at once); any other failure is retried after it.
    async fn failed(&mut self, failure: &Failure, delay: Duration) -> Next {
        let Some(keys) = self.failed.take() else {
            return Next::After(delay);
        };
        let (engine, n, msg) = (
            self.ctx.engine.clone(),
            self.name.clone(),
            failure_text(failure),
        );
        let now = Timestamp::now();
        if let Err(e) = blocking(move || engine.defer_pushes(&n, &keys, &msg, delay, now)).await {
            tracing::error!(connector = %self.name, error = %e, "cannot defer pushes");
        }
        Next::Now
    }
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Connector(e) => e.to_string(),
        Failure::Store { error, .. } => error.to_string(),
    }
}

#[cfg(test)]
mod linger_tests {
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
