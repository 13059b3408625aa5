//! The poll worker: reads a connector's changes page by page.
//!
//! It polls once at start (a first run reads everything; later runs catch up), then waits
//! for a [`Trigger`]: its interval or cron tick, a scheduled full resync, a webhook
//! arrival, an operator's resync. Each step reads one page and applies it with its cursor
//! in one transaction; a read continues until the source says there is no more. A full
//! resync starts from the beginning, first giving dead letters another chance, and after
//! an error carries on from the page that failed; an incremental read that fails ends,
//! and the next one (after the back-off, or sooner if triggered) starts again from the
//! saved cursor. A dry run (`resync --full --dry-run`) reads like a full resync but
//! rehearses each page (decided, then discarded) into its report: no cursor is saved, and
//! the status keeps its cursor and last poll.

use std::sync::Arc;
use std::time::Duration;

use optout_core::retry::Backoff;
use optout_core::{Connector, Cursor, Page, Timestamp};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::runner::{Failure, Next, Step, StepCx, Worker};
use super::{
    DryRunCell, ResyncProgress, Schedule, StatusCell, Trigger, WorkerContext, blocking, sleep_opt,
};

/// What a poll worker needs besides its connector.
pub struct PollSettings {
    pub name: String,
    pub status: StatusCell,
    pub triggers: mpsc::Receiver<Trigger>,
    pub schedule: Schedule,
    pub full_resync: Option<Schedule>,
}

/// One read in progress: from a cursor to the end of what the source has.
struct Read {
    full: bool,
    cursor: Option<Cursor>,
    pages: u64,
    records: u64,
    progress: Option<mpsc::Sender<ResyncProgress>>,
    /// A dry run's report: pages are rehearsed into it, never applied.
    dry: Option<DryRunCell>,
}

/// The poll worker of one connector instance.
pub struct Poll<C: Connector + ?Sized> {
    connector: Arc<C>,
    ctx: Arc<WorkerContext>,
    settings: PollSettings,
    /// The trigger to serve once the current read is over.
    pending: Option<Trigger>,
    read: Option<Read>,
    /// When a failed incremental read is tried again (unless triggered sooner).
    retry_at: Option<Instant>,
}

impl<C: Connector + ?Sized> Poll<C> {
    pub fn new(connector: Arc<C>, ctx: Arc<WorkerContext>, settings: PollSettings) -> Self {
        Poll {
            connector,
            ctx,
            settings,
            pending: Some(Trigger::Incremental { done: None }),
            read: None,
            retry_at: None,
        }
    }

    /// Begins a read for `trigger`: a full one re-queues dead letters and starts from the
    /// beginning, an incremental one from the saved cursor.
    async fn begin(&mut self, trigger: Trigger) -> Read {
        let (full, progress) = match trigger {
            Trigger::Incremental { done } => (false, done),
            Trigger::Full { done } => (true, done),
            Trigger::DryRun { done, report } => {
                tracing::info!(connector = %self.settings.name, "dry run started");
                return Read {
                    full: true,
                    cursor: None,
                    pages: 0,
                    records: 0,
                    progress: Some(done),
                    dry: Some(report),
                };
            }
        };
        let name = self.settings.name.clone();
        let engine = self.ctx.engine.clone();
        let cursor = if full {
            let n = name.clone();
            if let Ok(k) =
                blocking(move || engine.retry_dead_letters(Some(&n), Timestamp::now())).await
                && k > 0
            {
                tracing::info!(connector = %name, count = k, "dead letters re-queued by full resync");
            }
            tracing::info!(connector = %name, "full resync started");
            None
        } else {
            blocking(move || engine.store().cursor(&name))
                .await
                .ok()
                .flatten()
                .map(Cursor)
        };
        Read {
            full,
            cursor,
            pages: 0,
            records: 0,
            progress,
            dry: None,
        }
    }

    /// Stores a page read by `read`; the caller has checked nothing failed before.
    async fn store(&self, page: &Page, dry: Option<&DryRunCell>) -> Result<(), Failure> {
        let engine = self.ctx.engine.clone();
        let name = self.settings.name.clone();
        let obs = page.observations.clone();
        if let Some(cell) = dry {
            let report = blocking(move || engine.rehearse_page(&name, &obs, Timestamp::now()))
                .await
                .map_err(|error| Failure::Store {
                    doing: "could not rehearse a page",
                    error,
                })?;
            let mut into = cell.lock().unwrap_or_else(|p| p.into_inner());
            crate::reconcile::dry_run::fold(&mut into, page.observations.len(), report);
            return Ok(());
        }
        let c = page.cursor.0.clone();
        let report = blocking(move || engine.apply_page(&name, &obs, Some(&c), Timestamp::now()))
            .await
            .map_err(|error| Failure::Store {
                doing: "could not store a page; will re-read it",
                error,
            })?;
        self.ctx.after_apply(&self.settings.name, &report);
        // What the page carried may be dropped now (WhatsApp trims its inbox).
        self.connector.committed(page);
        Ok(())
    }

    /// Bookkeeping after a stored page: counts, status, progress; the end of the read
    /// when the source has no more.
    async fn advance(&mut self, mut read: Read, page: Page) -> Step {
        read.pages += 1;
        read.records += page.observations.len() as u64;
        read.cursor = Some(page.cursor.clone());
        let name = &self.settings.name;
        let dry = read.dry.is_some();
        {
            let mut s = self
                .settings
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !dry {
                s.cursor = Some(page.cursor.0.clone());
            }
            if read.full || page.more {
                let p = ResyncProgress::Reading {
                    connector: name.clone(),
                    records: read.records,
                    pages: read.pages,
                    source: page.progress,
                };
                s.resync = Some(p.text());
                if let Some(tx) = &read.progress {
                    let _ = tx.try_send(p);
                }
            }
        }
        if page.more {
            self.read = Some(read);
            return Step::from(Next::Now);
        }
        {
            let mut s = self
                .settings
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !dry {
                s.last_poll_ok = Some(Timestamp::now());
            }
            s.resync = None;
        }
        let (pages, records) = (read.pages, read.records);
        if dry {
            tracing::info!(connector = %name, pages, records, "dry run finished");
        } else if read.full {
            tracing::info!(connector = %name, pages, records, "full resync finished");
        }
        if let Some(tx) = &read.progress {
            let done = ResyncProgress::Done {
                connector: name.clone(),
                records,
                pages,
            };
            let _ = tx.send(done).await;
        }
        Step::recovered(Next::Idle)
    }
}

impl<C: Connector + ?Sized> Worker for Poll<C> {
    fn name(&self) -> &str {
        &self.settings.name
    }

    fn what(&self) -> &'static str {
        "poll"
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(300))
    }

    /// Reads and stores one page, beginning a read first if none is under way.
    async fn step(&mut self, cx: &mut StepCx) -> Result<Step, Failure> {
        let read = match self.read.take() {
            Some(read) => read,
            None => match self.pending.take() {
                Some(trigger) => self.begin(trigger).await,
                None => return Ok(Step::from(Next::Idle)),
            },
        };
        let polled = cx.unless_cancelled(self.connector.poll(read.cursor.as_ref()));
        let page = match polled.await {
            None => return Ok(Step::from(Next::Stop)),
            Some(Ok(page)) => page,
            Some(Err(e)) => {
                self.read = Some(read);
                return Err(Failure::Connector(e));
            }
        };
        cx.backoff.reset();
        if let Err(f) = self.store(&page, read.dry.as_ref()).await {
            // The read ends (a full resync too); the next one starts from the saved cursor.
            drop(read);
            return Err(f);
        }
        Ok(self.advance(read, page).await)
    }

    /// Waits for a trigger, a tick (or the retry of a failed read) or the full resync.
    async fn wait(&mut self) -> Next {
        let tick = self
            .retry_at
            .map(|t| t.saturating_duration_since(Instant::now()))
            .or_else(|| self.settings.schedule.next());
        let full = self.settings.full_resync.as_ref().and_then(Schedule::next);
        let trigger = tokio::select! {
            t = self.settings.triggers.recv() => match t {
                Some(t) => t,
                None => return Next::Stop,
            },
            _ = sleep_opt(tick) => Trigger::Incremental { done: None },
            _ = sleep_opt(full) => Trigger::Full { done: None },
        };
        self.retry_at = None;
        self.pending = Some(trigger);
        Next::Now
    }

    /// Tells a waiting operator; a full resync carries on from the failed page after the
    /// delay, an incremental read ends and is retried from the saved cursor.
    async fn failed(&mut self, failure: &Failure, delay: Duration) -> Next {
        let Some(read) = self.read.take() else {
            self.retry_at = Some(Instant::now() + delay);
            return Next::Idle;
        };
        if let (Failure::Connector(e), Some(tx)) = (failure, &read.progress) {
            let p = ResyncProgress::Retrying {
                connector: self.settings.name.clone(),
                error: e.to_string(),
                delay,
            };
            let _ = tx.send(p).await;
        }
        if read.full {
            self.read = Some(read);
            return Next::After(delay);
        }
        self.retry_at = Some(Instant::now() + delay);
        Next::Idle
    }
}
