//! optout-sync connector for outbound webhooks: every consent decision change the core
//! pushes is POSTed as a signed JSON event (`consent.changed`) to one configured URL, so
//! automation tools we do not integrate directly (Zapier, Make, n8n, in-house senders)
//! learn of every opt-out. Push-only: `poll` reads nothing.
//!
//! The event format and signing scheme are a public contract, documented in README.md.
//!
//! Code map: `config` (the TOML table), `event` (the JSON contract), `signature`
//! (HMAC signing and verification), `client` (one HTTP delivery and its classification),
//! `push` (a batch: concurrency, holding back after a 429 or a dead endpoint), `fake`
//! (a receiver for tests and the demo, feature `fake`).

mod client;
mod config;
mod event;
#[cfg(feature = "fake")]
pub mod fake;
mod push;
mod signature;

use optout_core::{Connector, ConnectorError, Cursor, Health, Page, PushItem, PushOutcome, Secret};

pub use config::Config;
pub use event::{EVENT_TYPE, Event, Identities, event_id};
pub use signature::{sign, verify_signature};

/// The outbound-webhook connector (`kind = "webhook"`).
#[derive(Debug)]
pub struct WebhookConnector {
    /// The instance name, for logs.
    name: String,
    sender: client::Sender,
    batch_size: usize,
    concurrency: usize,
}

impl WebhookConnector {
    /// Resolves the secrets named in `config` and builds the connector.
    pub fn new(name: &str, config: Config) -> Result<Self, ConnectorError> {
        let resolve = |key: &str, r: &optout_core::SecretRef| {
            r.resolve()
                .map_err(|e| ConnectorError::Config(format!("{key}: {e}")))
        };
        let secret = resolve("secret", &config.secret)?;
        let bearer = match &config.bearer_token {
            Some(r) => Some(resolve("bearer_token", r)?),
            None => None,
        };
        Self::with_secrets(name, config, secret, bearer)
    }

    /// Builds the connector from secrets already in hand (the `secret` and
    /// `bearer_token` references of `config` are not read), e.g. for the demo.
    pub fn with_secrets(
        name: &str,
        config: Config,
        secret: Secret,
        bearer_token: Option<Secret>,
    ) -> Result<Self, ConnectorError> {
        let sender = client::Sender::new(&config, secret, bearer_token)?;
        Ok(WebhookConnector {
            name: name.to_string(),
            sender,
            batch_size: config.batch_size,
            concurrency: config.concurrency,
        })
    }
}

impl Connector for WebhookConnector {
    /// Push-only: nothing to read. The cursor comes back unchanged.
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        Ok(Page {
            observations: Vec::new(),
            cursor: cursor.cloned().unwrap_or_else(|| Cursor(String::new())),
            more: false,
            progress: None,
        })
    }

    async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        push::push(&self.name, &self.sender, batch, self.concurrency).await
    }

    /// Reports ok without a request: webhook receivers commonly answer HEAD or OPTIONS
    /// with 404 or 405 (or run an automation on any request), so a probe would say
    /// nothing reliable. Delivery failures show up as push outcomes instead. Only the
    /// host is shown, since the URL's path may carry a token.
    async fn health(&self) -> Health {
        Health {
            ok: true,
            detail: format!(
                "posts events to {} (not probed: webhook receivers do not answer probes reliably)",
                self.sender.host()
            ),
        }
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }
}
