//! The connector contract against the fake receiver. The webhook connector only pushes
//! (its poll is always empty), so the paging and cursor checks do not apply.

use std::time::Duration;

use optout_core::testkit::contract::{self, Harness};
use optout_core::testkit::{push_item, secret_file};
use optout_core::{PushItem, Status, Timestamp};
use optout_webhook::fake::{self, FakeHandle, FakeOptions, Fault};
use optout_webhook::{Config, WebhookConnector};

const KEY: &str = "whsec-contract-key";

struct Receiver {
    fake: FakeHandle,
    connector: WebhookConnector,
    _secrets: tempfile::TempDir,
}

impl Receiver {
    async fn start() -> Receiver {
        let fake = fake::start(FakeOptions {
            secret: KEY.as_bytes().to_vec(),
            ..FakeOptions::default()
        })
        .await;
        let secrets = tempfile::tempdir().unwrap();
        let mut config = Config::new(fake.url(), secret_file(secrets.path(), KEY));
        config.timeout = Duration::from_secs(5);
        Receiver {
            connector: WebhookConnector::new("hooks", config).unwrap(),
            fake,
            _secrets: secrets,
        }
    }
}

impl Harness for Receiver {
    type Connector = WebhookConnector;
    // Push-only: nothing to page through.
    const READS: bool = false;
    const POLLS_OVER_HTTP: bool = false;

    fn connector(&self) -> &WebhookConnector {
        &self.connector
    }

    async fn seed(&self, _numbers: &[String]) -> Vec<String> {
        unreachable!("the contract reads nothing from a push-only connector")
    }

    async fn push_batch(&self, n: usize) -> Vec<PushItem> {
        (0..n)
            .map(|i| {
                push_item(
                    &format!("subject-{i}"),
                    Status::OptedOut,
                    Timestamp(1_751_920_000_000 + i as i64),
                )
            })
            .collect()
    }

    fn refuse(&self, item: &PushItem) {
        self.fake.refuse_subject(&item.subject);
    }

    fn throttle_next(&self, retry_after: Duration) {
        self.fake.script([Fault::TooManyRequests {
            retry_after_secs: retry_after.as_secs().max(1),
        }]);
    }

    /// One status per distinct event received for the item's subject.
    fn held(&self, item: &PushItem) -> Vec<Status> {
        self.fake
            .events()
            .into_iter()
            .filter(|e| e.subject == item.subject)
            .map(|e| match e.status.as_str() {
                "opted_out" => Status::OptedOut,
                "opted_in" => Status::OptedIn,
                other => panic!("unknown status {other}"),
            })
            .collect()
    }
}

#[tokio::test]
async fn the_webhook_connector_keeps_the_contract() {
    contract::run(Receiver::start).await;
}
