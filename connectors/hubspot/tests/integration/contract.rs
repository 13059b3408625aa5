//! The connector contract against the fake portal (with a marketing-consent property).

use std::time::Duration;

use optout_core::testkit::contract::{self, Harness};
use optout_core::testkit::push_item;
use optout_core::{PushItem, Status, Timestamp};
use optout_hubspot::HubSpot;
use optout_hubspot::fake::{self, FakeHandle, FakeOptions, Limits, NewContact};

use crate::common::connector;

struct Portal {
    fake: FakeHandle,
    connector: HubSpot,
}

impl Portal {
    async fn start() -> Portal {
        let fake = fake::start(FakeOptions {
            limits: Limits::off(),
            ..FakeOptions::default()
        })
        .await;
        fake.add_consent_enumeration(fake::MARKETING_PROPERTY);
        // The smallest overlap: a pass still re-reads the second before it began (the
        // `Date` header's resolution), which `let_time_pass` moves the clock past.
        let connector = connector(&fake, |c| {
            c.page_size = 100;
            c.overlap = Duration::ZERO;
            c.marketing_property = Some(fake::MARKETING_PROPERTY.into());
        });
        Portal { fake, connector }
    }

    fn contacts(&self, numbers: &[String]) -> Vec<String> {
        self.fake
            .create_contacts(numbers.iter().map(|n| NewContact::new().with("phone", n)))
    }
}

impl Harness for Portal {
    type Connector = HubSpot;

    fn connector(&self) -> &HubSpot {
        &self.connector
    }

    async fn seed(&self, numbers: &[String]) -> Vec<String> {
        self.contacts(numbers)
    }

    fn let_time_pass(&self) {
        self.fake.advance_clock(Duration::from_secs(5));
    }

    async fn push_batch(&self, n: usize) -> Vec<PushItem> {
        let numbers: Vec<String> = (0..n).map(|i| format!("+1555900{i:04}")).collect();
        self.contacts(&numbers)
            .iter()
            .map(|id| push_item(id, Status::OptedOut, Timestamp::now()))
            .collect()
    }

    fn refuse(&self, item: &PushItem) {
        assert!(self.fake.delete_contact(&item.record));
    }

    fn throttle_next(&self, retry_after: Duration) {
        self.fake.throttle_next(retry_after);
    }

    fn held(&self, item: &PushItem) -> Vec<Status> {
        match self
            .fake
            .property(&item.record, "whatsapp_consent")
            .as_deref()
        {
            None | Some("") => vec![],
            Some("opted_out") => vec![Status::OptedOut],
            Some("opted_in") => vec![Status::OptedIn],
            Some(other) => panic!("unexpected consent value {other}"),
        }
    }

    const MARKETING: bool = true;

    fn held_marketing(&self, item: &PushItem) -> Option<Status> {
        match (self.fake)
            .property(&item.record, fake::MARKETING_PROPERTY)
            .as_deref()
        {
            Some("opted_out") => Some(Status::OptedOut),
            Some("opted_in") => Some(Status::OptedIn),
            _ => None,
        }
    }
}

#[tokio::test]
async fn hubspot_keeps_the_contract() {
    contract::run(Portal::start).await;
}
