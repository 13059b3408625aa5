//! Helpers shared by the integration tests: a connector wired to a fake portal, and a
//! poll loop that behaves like the daemon's poll worker.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use optout_core::{
    Connector, ConnectorError, Cursor, Observation, PushItem, RecordSnapshot, Scope, SecretRef,
    Status, Timestamp,
};
use optout_hubspot::fake::{self, FakeHandle};
use optout_hubspot::{Config, HubSpot};

/// A secret in a private temporary file (created with mode 0600).
pub fn secret_file(value: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(value.as_bytes()).unwrap();
    f
}

/// The connector's defaults against the fake, with the private-app token, and the
/// client-side limiter out of the way unless `tweak` sets it.
pub fn connector(fake: &FakeHandle, tweak: impl FnOnce(&mut Config)) -> HubSpot {
    let token = secret_file(fake::TOKEN);
    let mut cfg = Config {
        base_url: fake.base_url(),
        token: Some(SecretRef::File(token.path().into())),
        requests_per_10s: 1_000_000,
        search_per_second: 1_000_000,
        timeout: Duration::from_secs(5),
        ..Config::default()
    };
    tweak(&mut cfg);
    HubSpot::new("hubspot-test", cfg).unwrap()
}

pub fn records(obs: Vec<Observation>) -> Vec<RecordSnapshot> {
    obs.into_iter()
        .map(|o| match o {
            Observation::Record(r) => r,
            other => panic!("HubSpot reports records only, got {other:?}"),
        })
        .collect()
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
    PushItem {
        key: format!("{record}/all"),
        record: record.to_string(),
        status,
        scope: Scope::All,
        changed_at,
        source: "whatsapp:keyword".into(),
        subject: format!("subject-{record}"),
        identities: vec![],
        reply: None,
    }
}
