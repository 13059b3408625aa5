//! optout-sync connector for the WhatsApp Cloud API.
//!
//! Meta only pushes, so this connector has two halves that meet at a durable inbox the
//! daemon owns ([`Inbox`]):
//! - the webhook ([`router`], [`WebhookState`]) verifies Meta's signature and appends raw
//!   bodies to the inbox before acknowledging them;
//! - the [`Connector`] impl drains the inbox in pages (`poll`), turning bodies into consent
//!   events ([`parse`], [`detect`]), and sends confirmation replies (`push`) through the
//!   Graph API ([`client`]).
//!
//! What the daemon does with it:
//! 1. implement [`Inbox`] on its store (append durable before returning, sequence numbers
//!    never reused, quarantined bodies kept apart for the operator);
//! 2. build one [`WhatsApp`] with `WhatsApp::new(name, config, inbox)` and mount
//!    [`WhatsApp::router`] (`GET`/`POST /webhooks/whatsapp`) on its HTTP listener;
//! 3. run the poll and push workers like any other connector, waking the poll worker on
//!    [`WebhookState::appended`] (from [`WhatsApp::webhook`]) instead of a timer;
//! 4. after saving a poll's cursor (the last inbox sequence number read), delete inbox
//!    entries up to it;
//! 5. dedupe events by `message_id` across polls: a page holds each id once, but Meta may
//!    redeliver a body after the page that first carried it was applied.

pub mod client;
pub mod config;
pub mod detect;
#[cfg(feature = "fake")]
pub mod fake;
pub mod inbox;
pub mod parse;
mod poll;
mod push;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;

use optout_core::{
    Connector, ConnectorError, Cursor, Health, Page, PushItem, PushOutcome, Timestamp,
};

pub use config::{Config, Confirmations, Texts};
pub use detect::{Detection, Detector, Keywords};
pub use inbox::{Inbox, InboxEntry, InboxError};
pub use webhook::{PATH as WEBHOOK_PATH, WebhookState, router};

use client::{Graph, Reply};

/// Confirmations are sent one by one; a small batch keeps one push call short.
pub const MAX_BATCH: usize = 20;

pub struct WhatsApp<I: Inbox> {
    name: String,
    config: Config,
    detector: Detector,
    texts: BTreeMap<String, Texts>,
    inbox: Arc<I>,
    webhook: Arc<WebhookState<I>>,
    /// Present when confirmations are enabled.
    graph: Option<Graph>,
}

impl<I: Inbox> std::fmt::Debug for WhatsApp<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhatsApp")
            .field("name", &self.name)
            .field("confirmations", &self.config.confirmations.enabled)
            .finish_non_exhaustive()
    }
}

impl<I: Inbox> WhatsApp<I> {
    /// Validates the configuration and resolves its secrets (the access token only when
    /// confirmations are enabled). `inbox` is the daemon's durable inbox, shared by the
    /// webhook (writes) and the poll (reads).
    pub fn new(name: &str, config: Config, inbox: Arc<I>) -> Result<Self, ConnectorError> {
        let problems = config.validate();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|(k, p)| format!("{k}: {p}")).collect();
            return Err(ConnectorError::Config(list.join("; ")));
        }
        let webhook = Arc::new(WebhookState::new(name, &config, inbox.clone())?);
        let graph = match (&config.access_token, config.confirmations.enabled) {
            (Some(token), true) => Some(Graph::new(
                config.graph_root(),
                config.phone_number_id.clone(),
                token.clone(),
                config.timeout,
                config.max_sends_per_second,
            )?),
            _ => None,
        };
        Ok(WhatsApp {
            name: name.to_string(),
            detector: Detector::new(&config.keywords),
            texts: config.confirmations.effective_texts(),
            config,
            inbox,
            webhook,
            graph,
        })
    }

    /// The webhook state, e.g. to wait on [`WebhookState::appended`].
    pub fn webhook(&self) -> Arc<WebhookState<I>> {
        self.webhook.clone()
    }

    /// `GET`/`POST` [`WEBHOOK_PATH`], for the daemon's listener.
    pub fn router(&self) -> axum::Router {
        router(self.webhook.clone())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<I: Inbox> Connector for WhatsApp<I> {
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        poll::poll(
            &self.name,
            self.inbox.as_ref(),
            &self.detector,
            cursor,
            self.config.page_size,
        )
        .await
    }

    async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        push::push(
            self.graph.as_ref(),
            &self.config.confirmations,
            &self.texts,
            batch,
            Timestamp::now(),
        )
        .await
    }

    /// With confirmations off nothing remote is used, so there is nothing to check; with
    /// them on, reads our own phone number with the access token.
    async fn health(&self) -> Health {
        let Some(graph) = &self.graph else {
            return Health {
                ok: true,
                detail: "webhook only (confirmations disabled)".into(),
            };
        };
        match graph.phone_number().await {
            Reply::Ok(_) => Health {
                ok: true,
                detail: "Graph API reachable; access token accepted".into(),
            },
            Reply::Graph(e) => Health {
                ok: false,
                detail: e.describe(),
            },
            Reply::Http(reason, _) => Health {
                ok: false,
                detail: reason,
            },
        }
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }
}
