//! The contract every connector keeps, written once and run by each connector's tests
//! against its own fake over real HTTP:
//!
//! - push outcomes are one per item, in the batch's order ([`outcomes_follow_the_batch`]);
//! - polling from the beginning terminates and reads every record once, and the returned
//!   cursor round-trips: polling on from it reads what is new and nothing already read
//!   ([`paging_terminates_and_the_cursor_round_trips`]);
//! - pushing the same batch twice is harmless ([`pushing_twice_is_harmless`]);
//! - a 429 becomes a wait, never a rejection ([`a_429_is_a_wait`]);
//! - for a CRM connector configured with a marketing-consent field, items of scope
//!   `marketing` write that field and only it, also when they share a batch (and a record)
//!   with items of scope `all` ([`marketing_items_write_their_own_field`]).
//!
//! A connector's test implements [`Harness`] (what only its fake knows: how to seed it,
//! throttle it and read it back) and calls [`run`], or the checks one by one.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use super::{observation_key, poll_to_end};
use crate::{Connector, ConnectorError, Cursor, PushItem, PushOutcome, Scope, Status};

/// The `Retry-After` the throttled fake answers with.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Records seeded for the paging check: the harness configures its connector's page size
/// below this, so the read takes more than one page.
pub const PAGED_RECORDS: usize = 250;

/// The longest wait a 429 may ask for in these checks: the fake says [`RETRY_AFTER`].
const LONGEST_WAIT: Duration = Duration::from_secs(10);

/// What the contract needs from one connector's fake.
pub trait Harness {
    type Connector: Connector;

    /// Whether `poll` reads anything. A push-only connector (the automation webhook) says
    /// false and the paging checks do not apply to it.
    const READS: bool = true;
    /// Whether `poll` asks the fake over HTTP, so that a throttled fake meets it. WhatsApp
    /// polls its own inbox, which no vendor can throttle.
    const POLLS_OVER_HTTP: bool = true;

    /// The connector under test, configured against the fake.
    fn connector(&self) -> &Self::Connector;

    /// Seeds one record (or inbound message) per number; returns the keys
    /// [`observation_key`] gives them when read. The connector's page size must be below
    /// [`PAGED_RECORDS`].
    fn seed(&self, numbers: &[String]) -> impl Future<Output = Vec<String>>;

    /// Moves the fake's clock past the window the connector re-reads on purpose after a
    /// pass (CRM connectors re-read a short overlap to catch writes indexed late; their
    /// harnesses configure the smallest one). Called between seeding and reading, so the
    /// cursor check sees a connector's own position, not its deliberate overlap.
    fn let_time_pass(&self) {}

    /// `n` push items for distinct targets that exist in the fake. The contract chooses
    /// the statuses.
    fn push_batch(&self, n: usize) -> impl Future<Output = Vec<PushItem>>;

    /// Makes the fake refuse `item` for good (a deleted record, a refused event, an
    /// undeliverable recipient).
    fn refuse(&self, item: &PushItem);

    /// Makes the fake answer the next request with 429 and `Retry-After: <retry_after>`.
    fn throttle_next(&self, retry_after: Duration);

    /// Every value the fake holds for `item`'s target: one for a record's consent field,
    /// one per distinct event or confirmation received.
    fn held(&self, item: &PushItem) -> Vec<Status>;

    /// Whether the connector is configured with a marketing-consent field, which
    /// [`Harness::held_marketing`] reads back.
    const MARKETING: bool = false;

    /// The value the fake holds in the marketing field of `item`'s record, if any.
    fn held_marketing(&self, _item: &PushItem) -> Option<Status> {
        None
    }
}

/// Runs every check, each on a fresh harness from `harness` (checks change the fake).
pub async fn run<H: Harness, F: Future<Output = H>>(mut harness: impl FnMut() -> F) {
    outcomes_follow_the_batch(&harness().await).await;
    paging_terminates_and_the_cursor_round_trips(&harness().await).await;
    pushing_twice_is_harmless(&harness().await).await;
    a_429_is_a_wait(&harness().await).await;
    marketing_items_write_their_own_field(&harness().await).await;
}

fn numbers(from: usize, n: usize) -> Vec<String> {
    (from..from + n).map(|i| format!("+1555{i:07}")).collect()
}

/// Opt-outs and opt-ins alternating, so a write that lands on the wrong target shows.
async fn mixed_batch<H: Harness>(h: &H, n: usize) -> Vec<PushItem> {
    let mut items = h.push_batch(n).await;
    assert_eq!(items.len(), n, "the harness built {n} items");
    for (i, item) in items.iter_mut().enumerate() {
        item.status = if i % 2 == 0 {
            Status::OptedOut
        } else {
            Status::OptedIn
        };
    }
    items
}

fn assert_held<H: Harness>(h: &H, items: &[PushItem], when: &str) {
    for item in items {
        assert_eq!(
            h.held(item),
            vec![item.status],
            "{when}: the fake holds what {} asked for",
            item.key
        );
    }
}

/// One outcome per item, in order: the refused item's outcome sits at its place.
pub async fn outcomes_follow_the_batch<H: Harness>(h: &H) {
    let items = mixed_batch(h, 6).await;
    h.refuse(&items[2]);
    let outcomes = match h.connector().push(&items).await {
        Ok(o) => o,
        Err(e) => panic!("a batch with one refused item failed as a whole: {e}"),
    };
    assert_eq!(outcomes.len(), items.len(), "one outcome per item");
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 2 {
            assert!(
                matches!(outcome, PushOutcome::Rejected { .. }),
                "the refused item is rejected at its place: {outcomes:?}"
            );
        } else {
            assert_eq!(outcome, &PushOutcome::Done, "item {i}: {outcomes:?}");
        }
    }
    let (before, after) = items.split_at(2);
    assert_held(h, before, "after a push");
    assert_held(h, &after[1..], "after a push");
}

/// Every seeded record read once from the beginning; from the returned cursor (through
/// its serialised form, as the store keeps it), only what was seeded since.
pub async fn paging_terminates_and_the_cursor_round_trips<H: Harness>(h: &H) {
    if !H::READS {
        return;
    }
    let first = h.seed(&numbers(0, PAGED_RECORDS)).await;
    h.let_time_pass();
    let (observations, cursor, pages) = poll_to_end(h.connector(), None).await;
    let read = read_once(&observations, "a full read");
    assert_eq!(
        read,
        first.iter().cloned().collect(),
        "a full read reads every record"
    );
    assert!(
        pages > 1,
        "the page size is below {PAGED_RECORDS}, so the read pages"
    );

    let stored = serde_json::to_string(&cursor).expect("a cursor serialises");
    let cursor: Cursor = serde_json::from_str(&stored).expect("a cursor deserialises");
    let (again, cursor, _) = poll_to_end(h.connector(), Some(cursor)).await;
    let reread: Vec<String> = again.iter().map(observation_key).collect();
    assert!(
        reread.iter().all(|k| !read.contains(k)),
        "polling on from the cursor re-reads nothing: {reread:?}"
    );

    let second = h.seed(&numbers(1_000, 3)).await;
    let (newer, _, _) = poll_to_end(h.connector(), Some(cursor)).await;
    let newer = read_once(&newer, "polling on");
    assert_eq!(
        newer,
        second.into_iter().collect(),
        "polling on reads only what is new"
    );
}

/// The keys of `observations`, each asserted to appear once.
fn read_once(observations: &[crate::Observation], what: &str) -> BTreeSet<String> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for o in observations {
        *counts.entry(observation_key(o)).or_default() += 1;
    }
    let twice: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        twice.is_empty(),
        "{what} read these more than once: {twice:?}"
    );
    counts.into_keys().collect()
}

/// The same batch pushed again: every outcome `Done` and the fake holds the same values.
pub async fn pushing_twice_is_harmless<H: Harness>(h: &H) {
    let items = mixed_batch(h, 4).await;
    for round in ["first", "second"] {
        match h.connector().push(&items).await {
            Ok(outcomes) => assert_eq!(
                outcomes,
                vec![PushOutcome::Done; items.len()],
                "the {round} push"
            ),
            Err(e) => panic!("the {round} push failed: {e}"),
        }
        assert_held(h, &items, round);
    }
}

/// A 429 from the fake: `poll` (when it asks the fake) fails with a retryable error that
/// carries the wait; `push` either does the same or answers `RetryLater` with the wait for
/// the items it could not send, and rejects none. After the wait everything goes through.
pub async fn a_429_is_a_wait<H: Harness>(h: &H) {
    if H::READS && H::POLLS_OVER_HTTP {
        let seeded = h.seed(&numbers(2_000, 3)).await;
        h.throttle_next(RETRY_AFTER);
        let wait = match h.connector().poll(None).await {
            Ok(page) => panic!("a throttled poll succeeded: {page:?}"),
            Err(e) => waits(&e),
        };
        tokio::time::sleep(wait).await;
        let (observations, _, _) = poll_to_end(h.connector(), None).await;
        let read = read_once(&observations, "the read after the wait");
        assert!(seeded.iter().all(|k| read.contains(k)), "{read:?}");
    }
    let items = mixed_batch(h, 3).await;
    h.throttle_next(RETRY_AFTER);
    let wait = match h.connector().push(&items).await {
        Err(e) => waits(&e),
        Ok(outcomes) => per_item_wait(&outcomes, items.len()),
    };
    tokio::time::sleep(wait).await;
    match h.connector().push(&items).await {
        Ok(outcomes) => assert_eq!(outcomes, vec![PushOutcome::Done; items.len()]),
        Err(e) => panic!("the push after the wait failed: {e}"),
    }
    assert_held(h, &items, "after the wait");
}

/// Items of scope `marketing` beside items of scope `all` for the same records, in one
/// batch: one `Done` each, both fields hold their own item's value; a marketing item alone
/// leaves the consent field as it was; pushing the batch again is harmless.
pub async fn marketing_items_write_their_own_field<H: Harness>(h: &H) {
    if !H::MARKETING {
        return;
    }
    let all = mixed_batch(h, 3).await;
    let twin = |item: &PushItem, status: Status| PushItem {
        key: format!("{}#marketing", item.key),
        scope: Scope::Marketing,
        status,
        ..item.clone()
    };
    let mut batch = Vec::new();
    for item in &all[..2] {
        batch.push(item.clone());
        batch.push(twin(item, Status::OptedOut));
    }
    batch.push(twin(&all[2], Status::OptedOut));
    let untouched = h.held(&all[2]);
    for round in ["first", "second"] {
        match h.connector().push(&batch).await {
            Ok(outcomes) => assert_eq!(outcomes, vec![PushOutcome::Done; batch.len()], "{round}"),
            Err(e) => panic!("the {round} push with marketing items failed: {e}"),
        }
        assert_held(h, &all[..2], round);
        for item in batch.iter().filter(|i| i.scope == Scope::Marketing) {
            assert_eq!(h.held_marketing(item), Some(Status::OptedOut), "{round}");
        }
        assert_eq!(
            h.held(&all[2]),
            untouched,
            "{round}: a marketing item leaves the consent field alone"
        );
    }
}

/// The wait a throttled call's error asks for; panics unless it is one.
fn waits(e: &ConnectorError) -> Duration {
    assert!(e.is_retryable(), "a 429 is retryable, not {e:?}");
    match e.retry_after() {
        Some(d) if d <= LONGEST_WAIT => d,
        other => panic!("a 429 carries the fake's Retry-After, got {other:?} from {e:?}"),
    }
}

/// The longest wait among per-item outcomes of a throttled push; panics on a rejection
/// or when no item was held back.
fn per_item_wait(outcomes: &[PushOutcome], n: usize) -> Duration {
    assert_eq!(outcomes.len(), n, "one outcome per item");
    let mut longest = None;
    for o in outcomes {
        match o {
            PushOutcome::Rejected { reason } => panic!("a 429 rejected an item: {reason}"),
            PushOutcome::RetryLater { after, .. } => match after {
                Some(d) if *d <= LONGEST_WAIT => longest = longest.max(Some(*d)),
                other => panic!("a held-back item carries the wait, got {other:?}"),
            },
            PushOutcome::Done => {}
        }
    }
    longest.unwrap_or_else(|| panic!("a throttled push held nothing back: {outcomes:?}"))
}
