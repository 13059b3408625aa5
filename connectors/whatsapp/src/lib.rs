//! optout-sync connector for the WhatsApp Cloud API.
//!
//! Meta only pushes, so this connector has two halves that meet at a durable inbox the
//! daemon owns ([`Inbox`], offered through the connector contract's `Host`):
//! - the webhook ([`router`], [`WebhookState`]) verifies Meta's signature and appends raw
//!   bodies to the inbox before acknowledging them;
//! - the [`Connector`] impl drains the inbox in pages (`poll`), turning bodies into consent
//!   events ([`parse`], [`detect`]) and template categories (the template webhooks; the
//!   configured `[templates]` lead the first page committed after each start), and sends
//!   confirmation replies (`push`) through the Graph API ([`client`]).
//!
//! What the daemon does with it, through the connector contract ([`Kind`]):
//! 1. implement [`Inbox`] on its store (append durable before returning, sequence numbers
//!    never reused, quarantined bodies kept apart for the operator) and offer it in `Host`;
//! 2. mount the connector's `routes` (`GET`/`POST /webhooks/whatsapp/{name}`, and
//!    `/webhooks/whatsapp` when `Host::sole_of_kind`) on its listener;
//! 3. run the poll and push workers like any other connector, waking the poll worker on
//!    `wake_up` instead of a timer;
//! 4. call `committed` after saving a poll's cursor (the last inbox sequence number read):
//!    the inbox drops entries up to it;
//! 5. dedupe events by `message_id` across polls: a page holds each id once, but Meta may
//!    redeliver a body after the page that first carried it was applied.

pub mod client;
pub mod config;
pub mod detect;
#[cfg(feature = "fake")]
pub mod fake;
pub mod parse;
mod poll;
mod preflight;
mod push;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use optout_core::{
    Connector, ConnectorError, Cursor, Finding, Health, Host, Observation, Page, Polling, Problem,
    PushItem, PushOutcome, SecretRef, Secrets, Takes, TemplateCategory, Timestamp,
};

pub use config::{Config, Confirmations, Texts};
pub use detect::{Detection, Detector, Keywords};
pub use optout_core::inbox::{Inbox, InboxEntry, InboxError};
pub use webhook::{PATH as WEBHOOK_PATH, WebhookState, instance_router, router};

use client::{Graph, Reply};

/// Confirmations are sent one by one; a small batch keeps one push call short.
pub const MAX_BATCH: usize = 20;

/// The `kind = "whatsapp"` entry of the daemon's registry.
pub struct Kind;

impl optout_core::Kind for Kind {
    const NAME: &'static str = "whatsapp";
    type Settings = Config;
}

/// Each stored webhook wakes the poll at once; this tick only catches a missed wake-up.
const SAFETY_TICK: Duration = Duration::from_secs(5);

impl optout_core::Settings for Config {
    fn validate(&self) -> Vec<Problem> {
        optout_core::contract::problems(Config::validate(self))
    }

    /// App secrets are keyed `app_secrets[i]`, so a message names which one.
    fn secrets(&self) -> Vec<(String, SecretRef)> {
        let mut out: Vec<(String, SecretRef)> = (self.app_secrets.iter().enumerate())
            .map(|(i, r)| (format!("app_secrets[{i}]"), r.clone()))
            .collect();
        out.push(("verify_token".into(), self.verify_token.clone()));
        if let Some(t) = &self.access_token {
            out.push(("access_token".into(), t.clone()));
        }
        out
    }

    fn takes(&self) -> Takes {
        if self.confirmations.enabled {
            Takes::Replies
        } else {
            Takes::Nothing
        }
    }

    fn polling(&self) -> Polling {
        Polling::Every(SAFETY_TICK)
    }

    fn id_namespace(&self) -> Option<String> {
        self.portfolio.clone()
    }

    fn build(
        &self,
        name: &str,
        secrets: &Secrets,
        host: &Host,
    ) -> Result<Arc<dyn optout_core::DynConnector>, ConnectorError> {
        let mut wa = WhatsApp::from_secrets(name, self.clone(), secrets, host.inbox.clone())?;
        wa.sole = host.sole_of_kind;
        Ok(Arc::new(wa))
    }
}

/// One WhatsApp Business Account's webhooks and replies, over the inbox `I` (the daemon's
/// store, or an in-memory inbox in tests).
pub struct WhatsApp<I: Inbox + ?Sized = dyn Inbox> {
    name: String,
    config: Config,
    detector: Detector,
    texts: BTreeMap<String, Texts>,
    inbox: Arc<I>,
    webhook: Arc<WebhookState<I>>,
    /// Present when confirmations are enabled.
    graph: Option<Graph>,
    /// The daemon's only WhatsApp connector: it also answers on the unnamed route.
    sole: bool,
    /// The configured template categories went out in a committed page (they are sent
    /// once per start, timed [`Timestamp::MIN`] so that any announced category wins).
    seeded: AtomicBool,
}

impl<I: Inbox + ?Sized> std::fmt::Debug for WhatsApp<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhatsApp")
            .field("name", &self.name)
            .field("confirmations", &self.config.confirmations.enabled)
            .finish_non_exhaustive()
    }
}

impl<I: Inbox + ?Sized> WhatsApp<I> {
    /// Validates the configuration and resolves its secrets (the access token only when
    /// confirmations are enabled). `inbox` is the daemon's durable inbox, shared by the
    /// webhook (writes) and the poll (reads).
    pub fn new(name: &str, config: Config, inbox: Arc<I>) -> Result<Self, ConnectorError> {
        let secrets = optout_core::contract::prepare(&config)?;
        WhatsApp::from_secrets(name, config, &secrets, inbox)
    }

    /// From checked settings and their resolved secrets (the daemon's path).
    fn from_secrets(
        name: &str,
        config: Config,
        secrets: &Secrets,
        inbox: Arc<I>,
    ) -> Result<Self, ConnectorError> {
        let webhook = Arc::new(WebhookState::new(name, &config, secrets, inbox.clone())?);
        let token = config
            .access_token
            .clone()
            .zip(secrets.optional("access_token"));
        let graph = match (token, config.confirmations.enabled) {
            (Some(token), true) => Some(Graph::new(
                config.graph_root(),
                config.phone_number_id.clone(),
                token,
                config.timeout,
                config.max_sends_per_second,
            )),
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
            sole: true,
            seeded: AtomicBool::new(false),
        })
    }

    /// The webhook state, e.g. to wait on [`WebhookState::appended`].
    pub fn webhook(&self) -> Arc<WebhookState<I>> {
        self.webhook.clone()
    }

    /// `GET`/`POST` `{WEBHOOK_PATH}/{name}`, and [`WEBHOOK_PATH`] when it is the only
    /// WhatsApp connector, for the daemon's listener.
    pub fn router(&self) -> axum::Router {
        instance_router(self.webhook.clone(), &self.name, self.sole)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configured template categories (`[templates]`), as observations for every
    /// language of each name.
    fn template_seeds(&self) -> Vec<Observation> {
        (self.config.templates.iter())
            .map(|(name, category)| {
                Observation::TemplateCategory(TemplateCategory {
                    name: name.clone(),
                    language: String::new(),
                    category: category.to_ascii_uppercase(),
                    upcoming: None,
                    at: Timestamp::MIN,
                    id: None,
                    evidence: format!("configured templates.{name}"),
                })
            })
            .collect()
    }
}

impl<I: Inbox + ?Sized> Connector for WhatsApp<I> {
    /// Drains the inbox; until a page has been committed since start, the configured
    /// template categories come first in it.
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        let mut page = poll::poll(
            &self.name,
            self.inbox.as_ref(),
            &self.detector,
            cursor,
            self.config.page_size,
        )
        .await?;
        if !self.seeded.load(Ordering::Acquire) {
            page.observations.splice(0..0, self.template_seeds());
        }
        Ok(page)
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

    /// Applied bodies leave the inbox (the page's cursor, their last sequence number, is
    /// stored already). A failure only delays the trim to the next page.
    fn committed(&self, page: &Page) {
        self.seeded.store(true, Ordering::Release);
        if let Ok(seq) = page.cursor.0.parse::<u64>()
            && let Err(e) = self.inbox.trim(seq)
        {
            tracing::warn!(connector = %self.name, error = %e, "cannot trim the webhook inbox; will retry after the next page");
        }
    }

    /// Each stored webhook wakes the poll: an opt-out never waits for a tick.
    fn wake_up(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.webhook.appended())
    }

    fn routes(&self) -> Option<axum::Router> {
        Some(self.router())
    }

    /// The access token, the phone number id and the webhook subscription; see
    /// `preflight.rs`.
    async fn preflight(&self) -> Vec<Finding> {
        self.run_preflight().await
    }
}
