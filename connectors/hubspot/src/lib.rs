//! The HubSpot connector of optout-sync.
//!
//! HubSpot's API cannot read or write WhatsApp subscription status, so consent lives in
//! three contact properties (names configurable): an enumeration (`whatsapp_consent` =
//! `opted_out` | `opted_in`), a datetime the daemon writes as the change time, and a text
//! naming the source. The connector polls contacts through CRM search ([`poll`](crate::poll)
//! explains the paging) and writes through batch update ([`push`](crate::push)). One
//! client-side limiter per instance keeps polling and pushing together under the portal's
//! limits.
//!
//! Code map: `lib.rs` (the connector and its registry entry, [`Kind`]), `config.rs`
//! (settings and validation), `client.rs` (auth, HTTP, error classification), `limit.rs` (client-side rate limiting), `poll.rs`, `push.rs`,
//! `properties.rs` (optional property creation), `preflight.rs` (live checks of the
//! credentials, scopes and properties), `fake.rs` (a stateful fake HubSpot, feature
//! `fake`).

mod client;
pub mod config;
mod limit;
mod poll;
mod preflight;
mod properties;
mod push;

#[cfg(feature = "fake")]
pub mod fake;

use std::sync::Arc;
use std::time::Duration;

use optout_core::{
    Connector, ConnectorError, Cursor, Finding, Health, Host, Page, Polling, Problem, PushItem,
    PushOutcome, SecretRef, Secrets, Takes,
};

pub use config::{Config, OAuthConfig};

use client::Client;
use limit::Limiter;

/// One HubSpot portal.
pub struct HubSpot {
    /// Instance name, for logs.
    name: String,
    config: Config,
    client: Client,
    /// Set once the consent properties were ensured (`create_properties`).
    prepared: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for HubSpot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSpot")
            .field("name", &self.name)
            .field("base_url", &self.config.base_url)
            .finish_non_exhaustive()
    }
}

/// The `kind = "hubspot"` entry of the daemon's registry.
pub struct Kind;

impl optout_core::Kind for Kind {
    const NAME: &'static str = "hubspot";
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
        Takes::Records
    }

    fn polling(&self) -> Polling {
        Polling::Every(DEFAULT_POLL)
    }

    fn marketing_field(&self) -> bool {
        self.marketing().is_some()
    }

    fn build(
        &self,
        name: &str,
        secrets: &Secrets,
        _host: &Host,
    ) -> Result<Arc<dyn optout_core::DynConnector>, ConnectorError> {
        Ok(Arc::new(HubSpot::from_secrets(
            name,
            self.clone(),
            secrets,
        )?))
    }
}

/// How often a portal is searched for changes when the configuration sets no schedule.
const DEFAULT_POLL: Duration = Duration::from_secs(30);

impl HubSpot {
    /// Validates the configuration and resolves its secrets. No request is sent.
    pub fn new(name: &str, config: Config) -> Result<Self, ConnectorError> {
        let secrets = optout_core::contract::prepare(&config)?;
        HubSpot::from_secrets(name, config, &secrets)
    }

    /// From checked settings and their resolved secrets (the daemon's path).
    fn from_secrets(name: &str, config: Config, secrets: &Secrets) -> Result<Self, ConnectorError> {
        let token = secrets.optional("token");
        let oauth = match &config.oauth {
            Some(o) => Some((
                o.client_id.clone(),
                secrets.get("oauth.client_secret")?,
                secrets.get("oauth.refresh_token")?,
            )),
            None => None,
        };
        Ok(HubSpot::build(name, config, token, oauth))
    }

    /// Like [`HubSpot::new`] with a private-app token given rather than referenced, for the
    /// `demo` command against the fake portal; `token` and `oauth` in `config` are ignored.
    pub fn with_token(
        name: &str,
        config: Config,
        token: optout_core::Secret,
    ) -> Result<Self, ConnectorError> {
        let problems = Config::validate(&config)
            .into_iter()
            .filter(|(key, _)| key != "token" && !key.starts_with("oauth."));
        optout_core::contract::refuse(optout_core::contract::problems(problems))?;
        Ok(HubSpot::build(name, config, Some(token), None))
    }

    fn build(
        name: &str,
        config: Config,
        token: Option<optout_core::Secret>,
        oauth: Option<(String, optout_core::Secret, optout_core::Secret)>,
    ) -> Self {
        let limiter = Limiter::new(
            config.requests_per_10s,
            config.search_per_second,
            config.daily_limit,
        );
        let client = Client::new(&config.base_url, config.timeout, limiter, token, oauth);
        HubSpot {
            name: name.to_string(),
            config,
            client,
            prepared: tokio::sync::OnceCell::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Connector for HubSpot {
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        self.prepare().await?;
        self.poll_page(cursor).await
    }

    async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        self.prepare().await?;
        self.push_batch(batch).await
    }

    /// One cheap authenticated read (`GET /crm/v3/objects/contacts?limit=1`): proves the
    /// base URL, the credentials and the read scope.
    async fn health(&self) -> Health {
        match self
            .client
            .get("/crm/v3/objects/contacts?limit=1")
            .await
            .and_then(|r| r.success())
        {
            Ok(_) => Health {
                ok: true,
                detail: "HubSpot contacts are readable".into(),
            },
            Err(e) => Health {
                ok: false,
                detail: e.to_string(),
            },
        }
    }

    fn max_batch(&self) -> usize {
        self.config.batch_size
    }

    /// Credentials, scopes and the consent properties; see `preflight.rs`.
    async fn preflight(&self) -> Vec<Finding> {
        self.run_preflight().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_refuses_bad_configuration_and_unreadable_secrets() {
        let e = HubSpot::new("hs", Config::default()).unwrap_err();
        assert!(
            matches!(&e, ConnectorError::Config(m) if m.contains("token")),
            "{e}"
        );

        let missing = Config {
            token: Some(SecretRef::Env("OPTOUT_HUBSPOT_SURELY_UNSET".into())),
            ..Config::default()
        };
        let e = HubSpot::new("hs", missing).unwrap_err();
        assert!(
            matches!(&e, ConnectorError::Config(m) if m.contains("OPTOUT_HUBSPOT_SURELY_UNSET")),
            "{e}"
        );

        let bad_page = Config {
            page_size: 201,
            ..Config::default()
        };
        let e =
            HubSpot::with_token("hs", bad_page.clone(), optout_core::Secret::new("t")).unwrap_err();
        assert!(
            matches!(&e, ConnectorError::Config(m) if m.starts_with("page_size") && !m.contains("token")),
            "{e}"
        );
        let ok = HubSpot::with_token(
            "hs",
            Config::default(),
            optout_core::Secret::new("pat-na1-x"),
        )
        .unwrap();
        assert_eq!(ok.max_batch(), 100);
        assert!(!format!("{ok:?}").contains("pat-na1-x"));
    }
}
