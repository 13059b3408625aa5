//! The push worker: drains a connector's outbox in batches, several in flight at once.
//!
//! Each step records a batch that has landed, or reads the due entries (at most a batch,
//! leaving out every key and record already in flight, so one record's pushes stay in
//! order) and sends them in the background while fewer than `push_pipeline` batches are
//! in flight. With nothing due, the worker waits for a landing, a wake-up (new entries) or
//! the earliest entry to become due. A partial batch goes at once unless entries are
//! arriving faster than a round-trip; then it is held while the stream should fill it
//! ([`Linger`]). Replies that must never be sent twice are marked in flight first. Every
//! outcome is recorded per entry version, so a newer value enqueued meanwhile is never
//! lost; a batch that failed as a whole is deferred by the back-off. Batches in flight when
//! the daemon stops are awaited and recorded; what was not sent stays in the outbox.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use optout_core::{Connector, ConnectorError, PushItem, PushOutcome, Timestamp};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::runner::{Failure, Next, Step, StepCx, Worker};
use super::{StatusCell, WorkerContext, blocking, sleep_opt};
use crate::metrics::ConnectorOutcome;
use crate::reconcile::Takes;
use crate::store::OutboxEntry;

/// The shortest stretch of recent arrivals the push worker judges their rate over.
const ARRIVAL_WINDOW: Duration = Duration::from_millis(250);

/// How long a push worker holds a partial batch (`push_linger`, `push_max_linger`).
///
/// Every request counts against the target's rate limit (HubSpot's smallest portals allow
/// 100 per 10 s), so a burst of opt-outs should go out in full batches; a lone opt-out
/// should not wait for company. Entries that arrive more slowly than one per round-trip
/// (or per `min`, if longer) go at once: holding them would only delay them. Faster ones
/// are held only while the arrival rate says the rest of a full batch will have come
/// before the oldest has waited `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linger {
    pub min: Duration,
    pub max: Duration,
}

/// What the push worker has seen of its traffic lately, for [`Linger::hold`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Entries per second arriving lately; 0 with no stream (a lone entry, one chunk).
    pub rate: f64,
    /// How long a recent push took, from sending to its outcomes stored.
    pub round_trip: Duration,
}

impl Linger {
    /// `n` entries are due (at most `batch`), the oldest for `waited`: how much longer to
    /// hold them, or `None` to send now.
    pub fn hold(
        &self,
        n: usize,
        batch: usize,
        waited: Duration,
        traffic: Traffic,
    ) -> Option<Duration> {
        if n == 0 || n >= batch || self.min.is_zero() || !traffic.rate.is_finite() {
            return None;
        }
        // Fewer than one more entry expected within a round-trip: nothing to wait for.
        let per = traffic.round_trip.max(self.min).as_secs_f64();
        if traffic.rate * per < 1.0 {
            return None;
        }
        let fill = Duration::from_secs_f64((batch - n) as f64 / traffic.rate);
        // Look again no sooner than `min` so that the check does not spin.
        (waited + fill <= self.max).then(|| fill.max(self.min).min(self.max - waited))
    }
}

/// Recent arrivals in the outbox, as the push worker saw them, to judge their rate.
///
/// Entries are counted when a read of the outbox first shows them, in groups (one read);
/// the rate is every entry in the window but the first, over the time since the oldest
/// group (for one group, at least `floor`: a page of entries seen at once came within one
/// read). A lone entry is no stream: rate 0.
#[derive(Debug)]
struct Arrivals {
    window: Duration,
    floor: Duration,
    groups: std::collections::VecDeque<(Instant, usize)>,
    /// The entries (key → version) already counted.
    seen: std::collections::HashMap<String, u64>,
}

impl Arrivals {
    fn new(window: Duration, floor: Duration) -> Self {
        Arrivals {
            window,
            floor,
            groups: Default::default(),
            seen: Default::default(),
        }
    }

    /// Counts the entries of `due` not seen before, at `now`.
    fn observe<'a>(&mut self, due: impl Iterator<Item = (&'a str, u64)>, now: Instant) {
        let mut fresh = 0;
        for (key, version) in due {
            if self.seen.insert(key.to_string(), version) != Some(version) {
                fresh += 1;
            }
        }
        if fresh > 0 {
            self.groups.push_back((now, fresh));
        }
        while let Some(&(at, _)) = self.groups.front()
            && now.duration_since(at) > self.window
        {
            self.groups.pop_front();
        }
    }

    /// Forgets sent entries (a later version of one counts as a new arrival).
    fn sent<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        for k in keys {
            self.seen.remove(k);
        }
    }

    /// Entries per second since the oldest group in the window.
    fn rate(&self, now: Instant) -> f64 {
        let Some(&(first, _)) = self.groups.front() else {
            return 0.0;
        };
        let after = self.groups.iter().map(|(_, n)| n).sum::<usize>() - 1;
        let mut span = now.duration_since(first);
        if self.groups.len() == 1 {
            span = span.max(self.floor);
        }
        let span = span.as_secs_f64();
        if after == 0 || span <= 0.0 {
            return 0.0;
        }
        after as f64 / span
    }
}

/// A batch sent and not yet recorded.
struct Flight {
    keys: Vec<(String, u64)>,
    items: Vec<PushItem>,
    result: Result<Vec<PushOutcome>, ConnectorError>,
    sent: Instant,
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
    /// The most batches in flight at once (`push_pipeline`).
    pipeline: usize,
    wake: Arc<Notify>,
    /// Since when the current partial batch has been held (monotonic, so a step of the
    /// wall clock cannot stretch the hold).
    held_since: Option<Instant>,
    /// Until when the current partial batch is held.
    hold_until: Option<Instant>,
    arrivals: Arrivals,
    /// Recent round-trips (push sent → answer), smoothed.
    round_trip: Duration,
    /// When the earliest pending entry becomes due, while idle.
    next_due: Option<Duration>,
    /// The batches in flight, and the keys and records they carry: an entry whose key or
    /// record is in flight waits for that push to land (per-record order).
    flights: JoinSet<Flight>,
    flying_keys: HashSet<String>,
    flying_records: HashSet<String>,
    /// A flight that landed while the worker waited.
    landed: Option<Flight>,
    /// When the back-off last grew for a batch without progress, and the delay it gave.
    grown: Option<(Instant, Duration)>,
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
        pipeline: usize,
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
            pipeline: pipeline.max(1),
            wake,
            held_since: None,
            hold_until: None,
            arrivals: Arrivals::new(linger.max.max(ARRIVAL_WINDOW), linger.min),
            round_trip: Duration::ZERO,
            next_due: None,
            flights: JoinSet::new(),
            flying_keys: HashSet::new(),
            flying_records: HashSet::new(),
            landed: None,
            grown: None,
            failed: None,
        }
    }

    /// The due entries not in flight, oldest key first, at most a batch; an unreadable
    /// outbox counts as empty (logged).
    async fn due(&self) -> Vec<(String, OutboxEntry)> {
        let (store, name) = (self.ctx.engine.store().clone(), self.name.clone());
        // Entries in flight come back from the read too: ask for that many more.
        let limit = self.max + self.flying_keys.len();
        match blocking(move || store.due_pushes(&name, Timestamp::now(), limit)).await {
            Ok(mut d) => {
                d.retain(|(k, e)| {
                    !self.flying_keys.contains(k) && !self.flying_records.contains(&e.item.record)
                });
                d.truncate(self.max);
                d
            }
            Err(e) => {
                tracing::error!(connector = %self.name, error = %e, "cannot read the outbox");
                Vec::new()
            }
        }
    }

    /// How long until the earliest pending entry is due, if any. While pushes are in
    /// flight their entries would count as due: their landing wakes the worker instead.
    async fn until_next_due(&self) -> Option<Duration> {
        if !self.flights.is_empty() {
            return None;
        }
        let (store, name) = (self.ctx.engine.store().clone(), self.name.clone());
        let next = blocking(move || store.next_due(&name)).await.ok().flatten();
        next.map(|t| t.since(Timestamp::now()).max(Duration::from_millis(1)))
    }

    /// How much longer to hold a partial batch of `due`, if at all.
    fn hold(&mut self, due: &[(String, OutboxEntry)]) -> Option<Duration> {
        let now = Instant::now();
        self.arrivals
            .observe(due.iter().map(|(k, e)| (k.as_str(), e.version)), now);
        // A retry has waited its back-off (or the target's Retry-After) already: it goes
        // as soon as it is due, with whatever is due beside it.
        if due.iter().any(|(_, e)| e.attempts > 0) {
            return None;
        }
        let oldest = due.iter().map(|(_, e)| e.not_before).min();
        let held = now.duration_since(*self.held_since.get_or_insert(now));
        let waited = oldest.map_or(held, |t| Timestamp::now().since(t).max(held));
        let traffic = Traffic {
            rate: self.arrivals.rate(now),
            round_trip: self.round_trip,
        };
        self.linger.hold(due.len(), self.max, waited, traffic)
    }

    /// The delay for a landed batch's items to retry. A batch in which anything went
    /// through shows the target works: they start again from the shortest delay (or their
    /// Retry-After). A batch that made no progress grows the back-off, once per episode:
    /// batches already in flight when it last grew (refused for the same reason at the
    /// same moment) get the same delay rather than doubling it each.
    fn retry_delay(&mut self, cx: &mut StepCx, progressed: bool, sent: Instant) -> Duration {
        if progressed {
            cx.backoff.reset();
            self.grown = None;
        } else if let Some((at, delay)) = self.grown
            && sent < at
        {
            return delay;
        }
        let delay = cx.backoff.next_delay(None);
        if !progressed {
            self.grown = Some((Instant::now(), delay));
        }
        delay
    }

    /// Folds a push's round-trip into the smoothed one.
    fn timed(&mut self, took: Duration) {
        self.round_trip = if self.round_trip.is_zero() {
            took
        } else {
            (self.round_trip * 3 + took) / 4
        };
    }

    /// Sends `due` as one batch in the background (replies marked in flight first).
    async fn launch(&mut self, due: Vec<(String, OutboxEntry)>) -> Result<(), Failure> {
        self.arrivals.sent(due.iter().map(|(k, _)| k.as_str()));
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
        self.flying_keys.extend(keys.iter().map(|(k, _)| k.clone()));
        self.flying_records
            .extend(items.iter().map(|i| i.record.clone()));
        // A leader whose lease ran out (a paused process, resumed) ends here, or between
        // two requests of the batch, instead of pushing.
        crate::leader::check_before_push(&self.name);
        let (connector, name) = (self.connector.clone(), self.name.clone());
        self.flights.spawn(async move {
            let sent = Instant::now();
            let result = crate::leader::within_lease(&name, connector.push(&items)).await;
            Flight {
                keys,
                items,
                result,
                sent,
            }
        });
        Ok(())
    }

    /// A flight that has landed, if any (without waiting).
    fn take_landed(&mut self) -> Option<Flight> {
        self.landed
            .take()
            .or_else(|| self.flights.try_join_next().map(joined))
    }

    /// Records a landed flight's outcomes; a batch that failed as a whole is an error
    /// (its keys are kept for [`Worker::failed`] to defer).
    async fn land(&mut self, cx: &mut StepCx, flight: Flight) -> Result<Step, Failure> {
        for (k, _) in &flight.keys {
            self.flying_keys.remove(k);
        }
        for i in &flight.items {
            self.flying_records.remove(&i.record);
        }
        self.timed(flight.sent.elapsed());
        let Flight {
            keys,
            items,
            result,
            sent,
        } = flight;
        match result {
            Ok(outcomes) if outcomes.len() == items.len() => {
                let stored = self.complete(cx, (&keys, &items, sent), outcomes).await;
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

    /// Records a batch's outcomes (one per item). Returns whether they were stored.
    async fn complete(
        &mut self,
        cx: &mut StepCx,
        flight: (&[(String, u64)], &[PushItem], Instant),
        outcomes: Vec<PushOutcome>,
    ) -> bool {
        let (keys, items, sent) = flight;
        let progressed = outcomes
            .iter()
            .any(|o| !matches!(o, PushOutcome::RetryLater { .. }));
        let delay = self.retry_delay(cx, progressed, sent);
        let now = Timestamp::now();
        let sent_at = now.minus(sent.elapsed());
        self.observe(items, &outcomes, now);
        let results: Vec<_> = keys
            .iter()
            .cloned()
            .zip(outcomes)
            .map(|((k, v), o)| (k, v, o))
            .collect();
        let (engine, n) = (self.ctx.engine.clone(), self.name.clone());
        let complete = move || engine.complete_pushes_sent(&n, &results, delay, now, sent_at);
        match blocking(complete).await {
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

    /// Defers a whole batch by `delay` in the outbox.
    async fn defer(&self, keys: Vec<(String, u64)>, msg: String, delay: Duration) {
        let (engine, n) = (self.ctx.engine.clone(), self.name.clone());
        let now = Timestamp::now();
        if let Err(e) = blocking(move || engine.defer_pushes(&n, &keys, &msg, delay, now)).await {
            tracing::error!(connector = %self.name, error = %e, "cannot defer pushes");
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

    /// Records a landed push, or sends one batch of due entries if a slot is free, or
    /// says there is nothing to do until a landing, a hold's end or new entries.
    async fn step(&mut self, cx: &mut StepCx) -> Result<Step, Failure> {
        if let Some(flight) = self.take_landed() {
            return self.land(cx, flight).await;
        }
        if self.flights.len() >= self.pipeline {
            self.hold_until = None;
            return Ok(Step::from(Next::Idle));
        }
        let due = self.due().await;
        if due.is_empty() {
            (self.held_since, self.hold_until) = (None, None);
            self.next_due = self.until_next_due().await;
            return Ok(Step::from(Next::Idle));
        }
        if let Some(wait) = self.hold(&due) {
            self.hold_until = Some(Instant::now() + wait);
            return Ok(Step::from(Next::Idle));
        }
        (self.held_since, self.hold_until) = (None, None);
        self.launch(due).await?;
        Ok(Step::from(Next::Now))
    }

    /// Waits for a push to land, a hold to end, new entries or the earliest pending one
    /// to become due. A held batch is not woken by new entries: the hold already counts
    /// on them.
    async fn wait(&mut self) -> Next {
        let free = self.flights.len() < self.pipeline;
        let (hold, idle) = (self.hold_until, free && self.hold_until.is_none());
        tokio::select! {
            j = self.flights.join_next(), if !self.flights.is_empty() => {
                self.landed = j.map(joined);
            }
            _ = sleep_until_opt(hold), if free && hold.is_some() => {}
            _ = self.wake.notified(), if idle => {}
            _ = sleep_opt(self.next_due), if idle => {}
        }
        Next::Now
    }

    /// A batch that failed as a whole waits the back-off in the outbox (and the worker
    /// moves on at once); any other failure is retried after it.
    async fn failed(&mut self, failure: &Failure, delay: Duration) -> Next {
        let Some(keys) = self.failed.take() else {
            return Next::After(delay);
        };
        self.defer(keys, failure_text(failure), delay).await;
        Next::Now
    }

    /// At shutdown: every push under way is finished and recorded; nothing new is sent.
    async fn finish(&mut self, cx: &mut StepCx) {
        while let Some(j) = self.flights.join_next().await {
            let flight = joined(j);
            if let Err(failure) = self.land(cx, flight).await {
                tracing::warn!(connector = %self.name, error = %failure_text(&failure), "push failed at shutdown; will retry");
                let delay = cx.backoff.next_delay(None);
                if let Some(keys) = self.failed.take() {
                    self.defer(keys, failure_text(&failure), delay).await;
                }
            }
        }
    }
}

/// A flight's result; a panic in the connector ends the daemon as any other panic.
fn joined(j: Result<Flight, tokio::task::JoinError>) -> Flight {
    match j {
        Ok(f) => f,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("push task ended without a result: {e}"),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

    /// `rate` entries a second, pushes taking `round_trip`.
    fn at(rate: f64, round_trip: Duration) -> Traffic {
        Traffic { rate, round_trip }
    }

    #[test]
    fn a_lone_entry_or_a_trickle_goes_at_once() {
        // Nothing else arriving: no hold at all, not even `min`.
        assert_eq!(
            linger().hold(1, 100, Duration::ZERO, Traffic::default()),
            None
        );
        // One every 15 ms to a target answering in 2 ms: fewer than one per `min`.
        assert_eq!(
            linger().hold(1, 100, Duration::ZERO, at(66.0, 2 * MS)),
            None
        );
        // 150 a second is more than one per `min`, but 100 would take 660 ms.
        assert_eq!(
            linger().hold(1, 100, Duration::ZERO, at(150.0, 2 * MS)),
            None
        );
        // A chunk seen at once (no stream measured yet) is not held for company.
        assert_eq!(
            linger().hold(40, 100, Duration::ZERO, Traffic::default()),
            None
        );
    }

    #[test]
    fn entries_faster_than_a_round_trip_are_batched() {
        // 60 a second against an 80 ms target: about five per round-trip, and the other
        // five of a batch of ten should come within ~83 ms.
        let wait = linger()
            .hold(5, 10, Duration::ZERO, at(60.0, 80 * MS))
            .unwrap();
        assert!((83 * MS..=84 * MS).contains(&wait), "{wait:?}");
        // The same rate against a 2 ms target: under one per `min`, so at once.
        assert_eq!(linger().hold(5, 10, Duration::ZERO, at(60.0, 2 * MS)), None);
    }

    #[test]
    fn a_burst_is_held_until_it_should_fill_the_batch() {
        // 2,600 a second with 26 due: the other 74 should come in about 28 ms.
        let wait = linger().hold(26, 100, 10 * MS, at(2600.0, MS)).unwrap();
        assert!((28 * MS..=29 * MS).contains(&wait), "{wait:?}");
        // Nearly full: look again after the minimum, not in a spin.
        assert_eq!(
            linger().hold(99, 100, 40 * MS, at(2500.0, MS)),
            Some(10 * MS)
        );
        // Never beyond the maximum.
        assert_eq!(
            linger().hold(99, 100, 245 * MS, at(400.0, MS)),
            Some(5 * MS)
        );
        assert_eq!(linger().hold(99, 100, 250 * MS, at(400.0, MS)), None);
        // 40 more at 300 a second take 133 ms: past the maximum, so send.
        assert_eq!(linger().hold(60, 100, 200 * MS, at(300.0, MS)), None);
        // Held past the maximum (a slow outbox read): send, whatever the rate.
        assert_eq!(linger().hold(99, 100, 400 * MS, at(1e6, MS)), None);
        let equal = Linger {
            min: 250 * MS,
            max: 250 * MS,
        };
        assert_eq!(equal.hold(10, 100, 260 * MS, at(1e6, MS)), None);
    }

    #[test]
    fn full_batches_and_zero_linger_go_at_once() {
        let burst = at(1e5, MS);
        assert_eq!(linger().hold(100, 100, Duration::ZERO, burst), None);
        let none = Linger {
            min: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(none.hold(1, 100, Duration::ZERO, burst), None);
        assert_eq!(linger().hold(0, 100, Duration::ZERO, burst), None);
    }

    fn view(v: &[(String, u64)]) -> impl Iterator<Item = (&str, u64)> {
        v.iter().map(|(k, n)| (k.as_str(), *n))
    }

    #[test]
    fn the_rate_counts_every_arrival_but_the_first_over_the_window() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(250 * MS, 10 * MS);
        let keys = |r: std::ops::Range<u64>| r.map(|i| (format!("k{i}"), 1)).collect::<Vec<_>>();
        // A lone entry is no stream, however long ago.
        a.observe(view(&keys(0..1)), t0);
        assert_eq!(a.rate(t0), 0.0);
        assert_eq!(a.rate(t0 + 5 * MS), 0.0);
        // 50 more seen at once 10 ms later: 50 in 10 ms, falling while nothing comes.
        let page = keys(1..51);
        a.observe(view(&page), t0 + 10 * MS);
        assert_eq!(a.rate(t0 + 10 * MS), 5000.0);
        assert_eq!(a.rate(t0 + 20 * MS), 2500.0);
        // Seen again: not counted twice.
        a.observe(view(&page), t0 + 20 * MS);
        assert_eq!(a.rate(t0 + 20 * MS), 2500.0);
        // A newer version of a sent entry is a new arrival.
        a.sent(["k1"].into_iter());
        a.observe([("k1", 2)].into_iter(), t0 + 20 * MS);
        assert_eq!(a.rate(t0 + 20 * MS), 2550.0);
        // Past the window the old groups are forgotten: one entry left, no stream.
        a.observe(std::iter::empty(), t0 + 265 * MS);
        assert_eq!(a.rate(t0 + 265 * MS), 0.0);
    }

    #[test]
    fn a_page_seen_at_once_counts_as_arriving_within_the_floor() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(250 * MS, 10 * MS);
        let page: Vec<_> = (0..100).map(|i| (format!("k{i}"), 1)).collect();
        a.observe(view(&page), t0);
        // 99 after the first within 10 ms: the next page of a sync is worth a short hold.
        assert_eq!(a.rate(t0), 9900.0);
        let wait = linger()
            .hold(100, 200, Duration::ZERO, at(a.rate(t0), MS))
            .unwrap();
        assert!((10 * MS..=11 * MS).contains(&wait), "{wait:?}");
        // No next page: the rate falls, and the page goes before `max`.
        assert_eq!(a.rate(t0 + 100 * MS), 990.0);
        let rate = a.rate(t0 + 130 * MS);
        assert_eq!(linger().hold(100, 200, 130 * MS, at(rate, MS)), None);
    }
}
