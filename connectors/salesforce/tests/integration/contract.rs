//! The connector contract against the fake org, reading and writing Contacts (with the
//! marketing-consent checkbox configured).

use std::time::Duration;

use optout_core::testkit::contract::{self, Harness};
use optout_core::testkit::push_item;
use optout_core::{PushItem, Status, Timestamp};
use optout_salesforce::SalesforceConnector;
use optout_salesforce::config::EXAMPLE_MARKETING_FIELD;
use optout_salesforce::fake::FakeOptions;
use serde_json::{Value, json};

use crate::against_fake::{Org, connector, only};

struct Contacts {
    org: Org,
    connector: SalesforceConnector,
}

impl Contacts {
    async fn start() -> Contacts {
        let org = Org::start(FakeOptions::default()).await;
        let mut config = only(&["Contact"], org.client_credentials());
        config.page_size = 200;
        // Without the overlap a pass resumes exactly after its position.
        config.overlap = Duration::ZERO;
        config.objects[0].marketing_field = Some(EXAMPLE_MARKETING_FIELD.into());
        Contacts {
            connector: connector(config),
            org,
        }
    }

    fn insert(&self, numbers: &[String]) -> Vec<String> {
        numbers
            .iter()
            .map(|n| {
                let id = self.org.fake.insert(
                    "Contact",
                    json!({"LastName": format!("Person {n}"), "MobilePhone": n}),
                );
                format!("Contact/{id}")
            })
            .collect()
    }
}

fn id(item: &PushItem) -> &str {
    item.record.strip_prefix("Contact/").expect("a Contact")
}

impl Harness for Contacts {
    type Connector = SalesforceConnector;

    fn connector(&self) -> &SalesforceConnector {
        &self.connector
    }

    async fn seed(&self, numbers: &[String]) -> Vec<String> {
        self.insert(numbers)
    }

    async fn push_batch(&self, n: usize) -> Vec<PushItem> {
        let numbers: Vec<String> = (0..n).map(|i| format!("+1555900{i:04}")).collect();
        self.insert(&numbers)
            .iter()
            .map(|record| push_item(record, Status::OptedOut, Timestamp::now()))
            .collect()
    }

    fn refuse(&self, item: &PushItem) {
        self.org.fake.delete(id(item));
    }

    fn throttle_next(&self, retry_after: Duration) {
        self.org.fake.throttle_next(retry_after);
    }

    fn held(&self, item: &PushItem) -> Vec<Status> {
        let row = self.org.fake.get(id(item)).expect("a known record");
        match row.get("WhatsApp_Opt_Out__c") {
            Some(Value::Bool(true)) => vec![Status::OptedOut],
            Some(Value::Bool(false)) => vec![Status::OptedIn],
            _ => vec![],
        }
    }

    const MARKETING: bool = true;

    fn held_marketing(&self, item: &PushItem) -> Option<Status> {
        let row = self.org.fake.get(id(item)).expect("a known record");
        match row.get(EXAMPLE_MARKETING_FIELD) {
            Some(Value::Bool(true)) => Some(Status::OptedOut),
            Some(Value::Bool(false)) => Some(Status::OptedIn),
            _ => None,
        }
    }
}

#[tokio::test]
async fn salesforce_keeps_the_contract() {
    contract::run(Contacts::start).await;
}
