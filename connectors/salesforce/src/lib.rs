//! The Salesforce connector of optout-sync.
//!
//! It reads a consent checkbox (default `WhatsApp_Opt_Out__c`) on Contact, Lead or any
//! configured object, and optionally `MessagingEndUser.MessagingConsentStatus` for WhatsApp
//! rows, by polling SOQL on `SystemModstamp`; it writes desired values back through sObject
//! Collections. It reports records as they are; deciding is the core's job.
//!
//! Code map: `lib.rs` (the connector and its registry entry, [`Kind`]), [`config`]
//! (settings and checks), `client` (login, HTTP, error classification,
//! API usage), `soql` (literal escaping), `records` (record ↔ snapshot and write mapping),
//! `poll` (cursor and paging), `push` (collections batches), `preflight` (live checks:
//! login, describe of every configured object), `fake` (a stateful fake org, feature
//! `fake`).

pub mod config;

mod client;
mod poll;
mod preflight;
mod push;
mod records;
pub mod soql;

#[cfg(feature = "fake")]
pub mod fake;

use std::sync::Arc;
use std::time::Duration;

use optout_core::{
    Connector, ConnectorError, Cursor, Finding, Health, Host, Page, Polling, Problem, PushItem,
    PushOutcome, SecretRef, Secrets, Takes,
};
use reqwest::Method;

pub use client::LIMIT_EXCEEDED_PAUSE;
pub use config::{AuthConfig, Config, ObjectConfig};
pub use push::CONFIG_RETRY;

use client::Client;
use records::Source;

/// One configured Salesforce org.
#[derive(Debug)]
pub struct SalesforceConnector {
    /// The instance name from the daemon's configuration, for logs.
    name: String,
    config: Arc<Config>,
    client: Client,
    /// The objects read and written, in reading order.
    sources: Vec<Source>,
    /// Objects whose writes Salesforce refuses for their configuration, with the reason
    /// (see `push`): the configuration alarm until a write of the object goes through.
    config_refusals: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

/// The `kind = "salesforce"` entry of the daemon's registry.
pub struct Kind;

impl optout_core::Kind for Kind {
    const NAME: &'static str = "salesforce";
    type Settings = Config;
}

/// How often the org is queried for changes when the configuration sets no schedule.
const DEFAULT_POLL: Duration = Duration::from_secs(30);

impl optout_core::Settings for Config {
    fn validate(&self) -> Vec<Problem> {
        optout_core::contract::problems(Config::validate(self))
    }

    fn secrets(&self) -> Vec<(String, SecretRef)> {
        optout_core::contract::secret_refs(Config::secrets(self))
    }

    fn takes(&self) -> Takes {
        Takes::Records
    }

    fn polling(&self) -> Polling {
        Polling::Every(DEFAULT_POLL)
    }

    fn marketing_field(&self) -> bool {
        self.objects.iter().any(|o| o.marketing().is_some())
    }

    fn build(
        &self,
        name: &str,
        secrets: &Secrets,
        _host: &Host,
    ) -> Result<Arc<dyn optout_core::DynConnector>, ConnectorError> {
        Ok(Arc::new(SalesforceConnector::from_secrets(
            name,
            self.clone(),
            secrets,
        )?))
    }
}

impl SalesforceConnector {
    /// Checks the configuration, resolves the secrets and parses the JWT key. No request is
    /// sent until the first poll, push or health check.
    pub fn new(name: &str, config: Config) -> Result<Self, ConnectorError> {
        let secrets = optout_core::contract::prepare(&config)?;
        SalesforceConnector::from_secrets(name, config, &secrets)
    }

    /// From checked settings and their resolved secrets (the daemon's path).
    fn from_secrets(name: &str, config: Config, secrets: &Secrets) -> Result<Self, ConnectorError> {
        let client = Client::new(name, &config, secrets)?;
        let mut sources: Vec<Source> = config.objects.iter().cloned().map(Source::Object).collect();
        if config.messaging_end_user {
            sources.push(Source::MessagingEndUser);
        }
        Ok(SalesforceConnector {
            name: name.to_string(),
            config: Arc::new(config),
            client,
            sources,
            config_refusals: Default::default(),
        })
    }

    /// Remembers that Salesforce refuses `object`'s writes for its configuration.
    fn config_refused(&self, object: &str, reason: &str) {
        let mut m = self
            .config_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.insert(object.to_string(), reason.to_string());
    }

    /// Writes of these records' objects went through: their refusals are over.
    fn config_cleared(&self, written: &[&push::Write<'_>]) {
        let mut m = self
            .config_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for w in written {
            m.remove(w.source.name());
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The org's API usage as last reported by Salesforce: (used, limit).
    pub fn api_usage(&self) -> Option<(u64, u64)> {
        self.client.usage()
    }
}

impl Connector for SalesforceConnector {
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        self.poll_page(cursor).await
    }

    async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        self.push_batch(batch).await
    }

    /// Logs in and reads `/limits` (one API call), reporting the org's daily API usage.
    async fn health(&self) -> Health {
        let path = format!("/services/data/{}/limits", self.config.api_version);
        match self.client.call(Method::GET, &path, &[], &[], None).await {
            Ok(v) => {
                let daily = &v["DailyApiRequests"];
                let detail = match (daily["Max"].as_u64(), daily["Remaining"].as_u64()) {
                    (Some(max), Some(rem)) => format!(
                        "daily API requests {}/{max} used; this connector may use up to {:.0}%",
                        max.saturating_sub(rem),
                        self.config.api_share * 100.0
                    ),
                    _ => match self.client.usage() {
                        Some((used, limit)) => format!("api usage {used}/{limit}"),
                        None => "reachable".to_string(),
                    },
                };
                Health { ok: true, detail }
            }
            Err(e) => Health {
                ok: false,
                detail: ConnectorError::from(e).to_string(),
            },
        }
    }

    fn max_batch(&self) -> usize {
        self.config.batch_size
    }

    /// Login, session, and every configured object's fields; see `preflight.rs`.
    async fn preflight(&self) -> Vec<Finding> {
        self.run_preflight().await
    }

    /// The objects Salesforce refuses writes to for their configuration, if any.
    fn config_alarm(&self) -> Option<String> {
        let m = self
            .config_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (!m.is_empty()).then(|| m.values().cloned().collect::<Vec<_>>().join("; "))
    }
}
