//! Helpers shared by the integration tests: a connector wired to a fake portal, and a
//! poll loop that behaves like the daemon's poll worker (retrying what is retryable, which
//! the test kit's `poll_to_end` does not).

use std::collections::HashSet;
use std::time::Duration;

use optout_core::testkit::{push_item, records, secret_file};
use optout_core::{Connector, ConnectorError, Cursor, PushItem, RecordSnapshot, Status, Timestamp};
use optout_hubspot::fake::{self, FakeHandle};
use optout_hubspot::{Config, HubSpot};

/// The connector's defaults against the fake, with the private-app token, and the
/// client-side limiter out of the way unless `tweak` sets it.
pub fn connector(fake: &FakeHandle, tweak: impl FnOnce(&mut Config)) -> HubSpot {
    // The connector reads its secrets when built; the files may go afterwards.
    let secrets = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        base_url: fake.base_url(),
        token: Some(secret_file(secrets.path(), fake::TOKEN)),
        requests_per_10s: 1_000_000,
        search_per_second: 1_000_000,
        timeout: Duration::from_secs(5),
        ..Config::default()
    };
    tweak(&mut cfg);
    HubSpot::new("hubspot-test", cfg).unwrap()
}

pub struct Synced {
    pub records: Vec<RecordSnapshot>,
    pub cursor: Cursor,
    pub pages: usize,
    /// Retryable errors met on the way (each followed by a wait and the same poll again).
    pub errors: Vec<ConnectorError>,
}

impl Synced {
    pub fn distinct_ids(&self) -> HashSet<&str> {
        self.records.iter().map(|r| r.record.as_str()).collect()
    }

    /// The last snapshot read of one record.
    pub fn last(&self, id: &str) -> Option<&RecordSnapshot> {
        self.records.iter().rev().find(|r| r.record == id)
    }
}

/// Polls until the source has nothing more right now, like the daemon's poll worker: a
/// retryable error waits for its hint (or a short backoff) and polls the same cursor again.
pub async fn sync(c: &HubSpot, cursor: Option<Cursor>) -> Synced {
    let mut s = Synced {
        records: vec![],
        cursor: Cursor(String::new()),
        pages: 0,
        errors: vec![],
    };
    let mut cur = cursor;
    loop {
        match c.poll(cur.as_ref()).await {
            Ok(page) => {
                s.pages += 1;
                assert!(s.pages < 1_000, "the poll loop does not end");
                s.records.extend(records(page.observations));
                cur = Some(page.cursor);
                if !page.more {
                    break;
                }
            }
            Err(e) if e.is_retryable() => {
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(10))).await;
                s.errors.push(e);
                assert!(s.errors.len() < 50, "too many errors: {:?}", s.errors);
            }
            Err(e) => panic!("poll failed: {e}"),
        }
    }
    s.cursor = cur.unwrap();
    s
}

pub fn item(record: &str, status: Status, changed_at: Timestamp) -> PushItem {
    push_item(record, status, changed_at)
}
