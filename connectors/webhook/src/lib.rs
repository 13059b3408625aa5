//! optout-sync connector for outbound webhooks: every consent decision change the core
//! pushes is POSTed as a signed JSON event (`consent.changed`) to one configured URL, so
//! automation tools we do not integrate directly (Zapier, Make, n8n, in-house senders)
//! learn of every opt-out. Push-only: `poll` reads nothing.
//!
//! The event format and signing scheme are a public contract, documented in README.md.
//!
//! Code map: `lib.rs` (the connector and its registry entry, [`Kind`]), `config` (the
//! TOML table), `event` (the JSON contract), `signature`
//! (HMAC signing and verification), `client` (one HTTP delivery and its classification),
//! `push` (a batch: concurrency, holding back after a 429 or a dead endpoint),
//! `preflight` (the receiver accepts connections), `fake`
//! (a receiver for tests and the demo, feature `fake`).

mod client;
mod config;
mod event;
#[cfg(feature = "fake")]
pub mod fake;
mod preflight;
mod push;
mod signature;

use std::sync::Arc;

use optout_core::{
    Connector, ConnectorError, Cursor, Finding, Health, Host, Page, Polling, Problem, PushItem,
    PushOutcome, Secret, SecretRef, Secrets, Takes,
};

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

/// The `kind = "webhook"` entry of the daemon's registry.
pub struct Kind;

impl optout_core::Kind for Kind {
    const NAME: &'static str = "webhook";
    type Settings = Config;
}

impl optout_core::Settings for Config {
    fn validate(&self) -> Vec<Problem> {
        optout_core::contract::problems(Config::validate(self))
    }

    fn secrets(&self) -> Vec<(String, SecretRef)> {
        optout_core::contract::secret_refs(Config::secrets(self))
    }

    fn takes(&self) -> Takes {
        Takes::Events
    }

    /// Push-only: there is nothing to read.
    fn polling(&self) -> Polling {
        Polling::Never
    }

    fn build(
        &self,
        name: &str,
        secrets: &Secrets,
        _host: &Host,
    ) -> Result<Arc<dyn optout_core::DynConnector>, ConnectorError> {
        let sender = client::Sender::new(
            self,
            secrets.get("secret")?,
            secrets.optional("bearer_token"),
        )?;
        Ok(Arc::new(WebhookConnector::from_sender(name, self, sender)))
    }
}

impl WebhookConnector {
    /// Checks `config`, resolves the secrets it names and builds the connector.
    pub fn new(name: &str, config: Config) -> Result<Self, ConnectorError> {
        let secrets = optout_core::contract::prepare(&config)?;
        let sender = client::Sender::new(
            &config,
            secrets.get("secret")?,
            secrets.optional("bearer_token"),
        )?;
        Ok(WebhookConnector::from_sender(name, &config, sender))
    }

    /// Builds the connector from secrets already in hand (the `secret` and
    /// `bearer_token` references of `config` are not read), e.g. for the demo.
    pub fn with_secrets(
        name: &str,
        config: Config,
        secret: Secret,
        bearer_token: Option<Secret>,
    ) -> Result<Self, ConnectorError> {
        optout_core::contract::refuse(optout_core::Settings::validate(&config))?;
        let sender = client::Sender::new(&config, secret, bearer_token)?;
        Ok(WebhookConnector::from_sender(name, &config, sender))
    }

    fn from_sender(name: &str, config: &Config, sender: client::Sender) -> Self {
        WebhookConnector {
            name: name.to_string(),
            sender,
            batch_size: config.batch_size,
            concurrency: config.concurrency,
        }
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

    /// The host resolves and accepts a TCP (and TLS) connection; nothing is sent. See
    /// `preflight.rs`.
    async fn preflight(&self) -> Vec<Finding> {
        self.sender.preflight().await
    }
}
