//! The connector contract for WhatsApp: its poll reads the inbox the webhook fills (seeded
//! here straight into the in-memory inbox, so no 429 can meet it), its push sends
//! confirmation replies through the fake Graph API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use optout_core::testkit::contract::{self, Harness, RETRY_AFTER};
use optout_core::testkit::push_item;
use optout_core::{Identity, PushItem, Reply, Status, Timestamp};
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{FakeGraph, GraphOptions, MemoryInbox, start_graph};
use optout_whatsapp::{Inbox, WhatsApp};

use crate::common::{ACCESS_TOKEN, PHONE_NUMBER_ID, Secrets, config, connector};

/// Graph's "message undeliverable": refused for good.
const UNDELIVERABLE: i64 = 131026;
/// Graph's throttling code, answered with 429 and `Retry-After`.
const THROTTLED: i64 = 130429;

struct Account {
    graph: FakeGraph,
    connector: WhatsApp<MemoryInbox>,
    inbox: Arc<MemoryInbox>,
    _secrets: Secrets,
}

impl Account {
    async fn start() -> Account {
        let graph = start_graph(GraphOptions {
            token: ACCESS_TOKEN.into(),
            phone_number_id: PHONE_NUMBER_ID.into(),
            retry_after: RETRY_AFTER,
            ..GraphOptions::default()
        })
        .await;
        let secrets = Secrets::new();
        let extra = "page_size = 100\n[confirmations]\nenabled = true";
        let (connector, inbox) = connector(config(&secrets, &graph.base_url(), extra));
        Account {
            graph,
            connector,
            inbox,
            _secrets: secrets,
        }
    }
}

fn wa_id(number: &str) -> String {
    number.trim_start_matches('+').to_string()
}

fn recipient(item: &PushItem) -> (&str, &str) {
    let reply = item.reply.as_ref().expect("a reply");
    match &reply.to {
        Identity::WaId(w) => (w, &reply.in_reply_to),
        other => panic!("replies go to wa_ids here, not {other:?}"),
    }
}

impl Harness for Account {
    type Connector = WhatsApp<MemoryInbox>;
    const POLLS_OVER_HTTP: bool = false;

    fn connector(&self) -> &Self::Connector {
        &self.connector
    }

    /// One STOP message per number, as the webhook would have stored it.
    async fn seed(&self, numbers: &[String]) -> Vec<String> {
        let mut keys = Vec::new();
        for (i, n) in numbers.iter().enumerate() {
            let id = format!("wamid.STOP{}", wa_id(n));
            let body = envelope::text(&Who::wa(&wa_id(n)), &id, 1_700_000_000 + i as i64, "STOP");
            self.inbox
                .append(Bytes::from(body), Timestamp::now())
                .await
                .unwrap();
            keys.push(id);
        }
        keys
    }

    async fn push_batch(&self, n: usize) -> Vec<PushItem> {
        (0..n)
            .map(|i| {
                let to = Identity::WaId(format!("1555900{i:04}"));
                PushItem {
                    key: format!("reply:wamid.IN{i}"),
                    identities: vec![to.clone()],
                    reply: Some(Reply {
                        to,
                        in_reply_to: format!("wamid.IN{i}"),
                        window_ends: Timestamp::now().plus(Duration::from_secs(3600)),
                        language: None,
                        clarify: false,
                    }),
                    ..push_item("whatsapp", Status::OptedOut, Timestamp::now())
                }
            })
            .collect()
    }

    fn refuse(&self, item: &PushItem) {
        self.graph.fail_recipient(recipient(item).0, UNDELIVERABLE);
    }

    fn throttle_next(&self, retry_after: Duration) {
        assert_eq!(
            retry_after, RETRY_AFTER,
            "the fake Graph was started with it"
        );
        self.graph.fail_next(1, THROTTLED);
    }

    /// The statuses confirmed in reply to the item's message, read from the (built-in,
    /// English) texts, each once. A confirmation is a message, not a value: the connector
    /// documents that it is not idempotent (pushing the same item again sends it again) and
    /// the core's outbox sends each at most once. What a repeat must not change is what the
    /// customer was told.
    fn held(&self, item: &PushItem) -> Vec<Status> {
        let (to, in_reply_to) = recipient(item);
        let mut told: Vec<Status> = self
            .graph
            .sent()
            .into_iter()
            .filter(|m| m.to.as_deref() == Some(to))
            .filter(|m| m.context_message_id.as_deref() == Some(in_reply_to))
            .map(|m| {
                if m.text.starts_with("You have been unsubscribed") {
                    Status::OptedOut
                } else if m.text.starts_with("You are subscribed again") {
                    Status::OptedIn
                } else {
                    panic!("an unexpected confirmation: {}", m.text)
                }
            })
            .collect();
        told.dedup();
        told
    }
}

#[tokio::test]
async fn whatsapp_keeps_the_contract() {
    contract::run(Account::start).await;
}
