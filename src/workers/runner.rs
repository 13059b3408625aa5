//! The one loop every worker runs in.
//!
//! A [`Worker`] is a small state machine: [`Worker::step`] does one unit of work (read a
//! page, send a batch, run a health check) and says what comes next ([`Next`]);
//! [`Worker::wait`] blocks until there is work again (a trigger, a tick, a wake-up).
//! [`run`] owns everything the workers used to repeat: it stops at cancellation (checked
//! before every step and watched during every wait, so no sleep outlives a shutdown),
//! backs off after a failed step, and keeps the connector's status and metrics (errors,
//! alarms, recovery). Steps themselves are not cut short by cancellation, so a push in
//! flight finishes and its outcome is recorded; a step that may be interrupted (a read)
//! does so through [`StepCx::unless_cancelled`].

use std::sync::Arc;
use std::time::Duration;

use optout_core::ConnectorError;
use optout_core::retry::Backoff;
use tokio_util::sync::CancellationToken;

use super::StatusCell;
use crate::metrics::{ConnectorOutcome, Metrics};
use crate::store::StoreError;

/// What the runner does after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Step again at once: there is more to do (another page, another batch).
    Now,
    /// Step again after this long (a linger, a back-off, a periodic check).
    After(Duration),
    /// Nothing to do: step again when [`Worker::wait`] says so.
    Idle,
    /// The worker is finished.
    Stop,
}

/// A successful step: what comes next, and whether it proved the connector works again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub next: Next,
    /// A full round trip succeeded (a read to the end, a batch's outcomes recorded): the
    /// runner clears an alarm. Not every success counts; a linger or an idle look at an
    /// empty outbox proves nothing.
    pub recovered: bool,
}

impl From<Next> for Step {
    fn from(next: Next) -> Self {
        Step {
            next,
            recovered: false,
        }
    }
}

impl Step {
    pub fn recovered(next: Next) -> Self {
        Step {
            next,
            recovered: true,
        }
    }
}

/// Why a step failed.
#[derive(Debug)]
pub enum Failure {
    /// The connector failed: counted in status and metrics, an alarm if an operator must
    /// act.
    Connector(ConnectorError),
    /// Our own store failed; `doing` says what was lost ("could not store a page; will
    /// re-read it"). Logged; the step is retried after a back-off.
    Store {
        doing: &'static str,
        error: StoreError,
    },
}

impl Failure {
    /// The vendor's own idea of how long to wait, if it gave one.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Connector(e) => e.retry_after(),
            Failure::Store { .. } => None,
        }
    }
}

/// What a step may use of the runner: the back-off (a push spaces its retries with it)
/// and the cancellation token.
pub struct StepCx {
    pub backoff: Backoff,
    cancel: CancellationToken,
}

impl StepCx {
    pub fn new(backoff: Backoff, cancel: CancellationToken) -> Self {
        StepCx { backoff, cancel }
    }

    /// Runs `f` unless the worker is stopped first (`None`).
    pub async fn unless_cancelled<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            v = f => Some(v),
            _ = self.cancel.cancelled() => None,
        }
    }
}

/// One background worker; see the module doc.
pub trait Worker: Send {
    /// The connector (or task) name, for logs and metrics.
    fn name(&self) -> &str;

    /// What its failures count as in the status (`poll`, `push`).
    fn what(&self) -> &'static str;

    /// The back-off after failed steps.
    fn backoff(&self) -> Backoff {
        Backoff::for_http()
    }

    /// When the first step runs.
    fn start(&self) -> Next {
        Next::Now
    }

    /// One unit of work.
    fn step(&mut self, cx: &mut StepCx) -> impl Future<Output = Result<Step, Failure>> + Send;

    /// Waits until there is work again ([`Next::Idle`]); `Stop` ends the worker.
    fn wait(&mut self) -> impl Future<Output = Next> + Send;

    /// After a failed step, once the failure is recorded: `delay` is the back-off's next
    /// delay. By default the step is retried after it.
    fn failed(&mut self, failure: &Failure, delay: Duration) -> impl Future<Output = Next> + Send {
        let _ = failure;
        async move { Next::After(delay) }
    }

    /// When the worker ends (stopped or finished): work it started in the background is
    /// completed (a push worker's batches in flight are awaited and recorded).
    fn finish(&mut self, cx: &mut StepCx) -> impl Future<Output = ()> + Send {
        let _ = cx;
        async {}
    }
}

/// Where a connector's worker records errors, alarms and recovery.
#[derive(Clone)]
pub struct Bookkeeping {
    pub metrics: Arc<Metrics>,
    pub status: StatusCell,
}

impl Bookkeeping {
    /// Counts the error, shows it in the status and raises an alarm when an operator
    /// must act.
    pub fn record_error(&self, name: &str, what: &str, e: &ConnectorError) {
        self.metrics
            .poll_errors
            .get_or_create(&ConnectorOutcome {
                connector: name.to_string(),
                outcome: format!("{what}_{}", e.kind()),
            })
            .inc();
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.healthy = false;
        s.last_error = Some(format!("{what}: {e}"));
        if what == "poll" {
            s.poll_errors += 1;
        } else {
            s.push_errors += 1;
        }
        if e.is_alarm() {
            s.alarm = Some(e.to_string());
            s.alarm_from = Some(what.to_string());
            self.metrics
                .alarm
                .get_or_create(&Metrics::connector(name))
                .set(1);
            tracing::error!(connector = %name, error = %e, "{what} failed: operator action needed");
        } else {
            tracing::warn!(connector = %name, error = %e, "{what} failed; will retry");
        }
    }

    /// Marks the connector healthy and lowers its alarm, if `what` (`poll`, `push`,
    /// `preflight`) raised it: a poll that works says nothing of a push refused for a
    /// missing property or scope, so it must not lower that alarm.
    pub fn clear_alarm(&self, name: &str, what: &str) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.healthy = true;
        if s.alarm.is_some() && s.alarm_from.as_deref().is_some_and(|w| w != what) {
            return;
        }
        s.alarm_from = None;
        if s.alarm.take().is_some() {
            self.metrics
                .alarm
                .get_or_create(&Metrics::connector(name))
                .set(0);
            tracing::info!(connector = %name, "connector recovered");
        }
    }
}

/// Runs `worker` until it stops or `cancel` fires. `book` receives its errors and
/// recoveries (a worker without one, such as the high-water saver, only logs).
pub async fn run<W: Worker>(mut worker: W, cancel: CancellationToken, book: Option<Bookkeeping>) {
    let mut cx = StepCx::new(worker.backoff(), cancel.clone());
    let mut next = worker.start();
    loop {
        if !pause(&mut worker, next, &cancel).await {
            worker.finish(&mut cx).await;
            return;
        }
        next = match worker.step(&mut cx).await {
            Ok(step) => {
                if step.recovered
                    && let Some(b) = &book
                {
                    b.clear_alarm(worker.name(), worker.what());
                }
                step.next
            }
            Err(failure) => {
                record(&worker, book.as_ref(), &failure);
                let delay = cx.backoff.next_delay(failure.retry_after());
                worker.failed(&failure, delay).await
            }
        };
    }
}

/// Waits as `next` says; false when the worker should end.
async fn pause<W: Worker>(worker: &mut W, mut next: Next, cancel: &CancellationToken) -> bool {
    loop {
        if cancel.is_cancelled() {
            return false;
        }
        next = match next {
            Next::Now => return true,
            Next::Stop => return false,
            Next::After(d) => tokio::select! {
                _ = tokio::time::sleep(d) => Next::Now,
                _ = cancel.cancelled() => Next::Stop,
            },
            Next::Idle => tokio::select! {
                n = worker.wait() => n,
                _ = cancel.cancelled() => Next::Stop,
            },
        };
    }
}

fn record<W: Worker>(worker: &W, book: Option<&Bookkeeping>, failure: &Failure) {
    let name = worker.name();
    match (failure, book) {
        (Failure::Connector(e), Some(b)) => b.record_error(name, worker.what(), e),
        (Failure::Connector(e), None) => {
            tracing::warn!(connector = %name, error = %e, "{} failed; will retry", worker.what())
        }
        (Failure::Store { doing, error }, _) => {
            tracing::error!(connector = %name, error = %error, "{doing}")
        }
    }
}
