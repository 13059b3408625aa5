//! The connector contract: what every connector crate gives the daemon besides its
//! [`Connector`](crate::Connector) implementation, so that the daemon configures, checks
//! and builds any connector without knowing its kind.
//!
//! A connector crate provides:
//! - a [`Kind`]: its `kind = "…"` name and the type of its own settings (a
//!   `#[serde(deny_unknown_fields)]` struct, parsed from its `[connectors.NAME]` table);
//! - for those settings, [`Settings`]: validation that returns every problem, the secret
//!   references it needs, what it takes as pushes ([`Takes`]), how it is polled
//!   ([`Polling`]), and `build`, which turns checked settings plus *resolved* secrets
//!   into a running connector.
//!
//! The daemon lists every kind once (its registry), validates every table and resolves
//! every secret in one place, and only then calls `build`: constructors neither validate
//! nor read secrets themselves.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use crate::connector::BoxFuture;
use crate::inbox::Inbox;
use crate::{Connector, ConnectorError, Cursor, Finding, Health, Page, PushItem, PushOutcome};
use crate::{Secret, SecretRef};

/// What a connector instance takes as pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Takes {
    /// CRM records: the consent value of every linked record.
    Records,
    /// WhatsApp: confirmation replies to keyword opt-outs/opt-ins (when enabled).
    Replies,
    /// Automation webhooks: every decision change.
    Events,
    /// Nothing (a WhatsApp instance with confirmations off).
    Nothing,
}

/// How the daemon polls a connector when its table sets no schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polling {
    /// Poll every this long (CRMs: 30 s; WhatsApp: a safety tick, since each webhook wakes
    /// the poll at once).
    Every(Duration),
    /// Never polled: a push-only connector (automation webhooks). A resync of it re-queues
    /// its dead letters.
    Never,
}

/// One problem in a connector's settings: the key within its table (dotted, empty for the
/// whole table) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A crate's `validate()` list of (key, message) as problems.
pub fn problems(list: impl IntoIterator<Item = (String, String)>) -> Vec<Problem> {
    list.into_iter().map(|(k, m)| Problem::new(k, m)).collect()
}

/// A crate's `secrets()` list of (key, reference) as owned pairs.
pub fn secret_refs<'a>(
    list: impl IntoIterator<Item = (&'a str, &'a SecretRef)>,
) -> Vec<(String, SecretRef)> {
    list.into_iter()
        .map(|(k, r)| (k.to_string(), r.clone()))
        .collect()
}

/// A connector's secrets, read once by the daemon, keyed as [`Settings::secrets`] named
/// them (`token`, `oauth.client_secret`, `app_secrets[0]` …).
#[derive(Clone, Debug, Default)]
pub struct Secrets(BTreeMap<String, Secret>);

impl Secrets {
    pub fn new(values: impl IntoIterator<Item = (String, Secret)>) -> Self {
        Secrets(values.into_iter().collect())
    }

    /// The secret under `key`; a missing one is a configuration error naming the key
    /// (never its value).
    pub fn get(&self, key: &str) -> Result<Secret, ConnectorError> {
        self.0
            .get(key)
            .cloned()
            .ok_or_else(|| ConnectorError::Config(format!("{key}: secret not resolved")))
    }

    /// Every secret with its key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Secret)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The secret under `key` if the settings referenced one.
    pub fn optional(&self, key: &str) -> Option<Secret> {
        self.0.get(key).cloned()
    }

    /// The secrets of a list (`app_secrets[0]`, `app_secrets[1]` …), in list order.
    pub fn list(&self, prefix: &str) -> Vec<Secret> {
        let index = |k: &str| -> Option<usize> {
            k.strip_prefix(prefix)?
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse()
                .ok()
        };
        let mut items: Vec<(usize, &Secret)> = self
            .0
            .iter()
            .filter_map(|(k, v)| Some((index(k)?, v)))
            .collect();
        items.sort_by_key(|(i, _)| *i);
        items.into_iter().map(|(_, v)| v.clone()).collect()
    }
}

/// Reads every secret the settings reference, once: the secrets read, and a problem
/// (naming the key and where the secret lives, never its value) for each one that cannot
/// be read.
pub fn resolve(settings: &dyn Settings) -> (Secrets, Vec<Problem>) {
    let mut secrets = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, reference) in settings.secrets() {
        match reference.resolve() {
            Ok(s) => {
                secrets.insert(key, s);
            }
            Err(e) => problems.push(Problem::new(key, e.to_string())),
        }
    }
    (Secrets(secrets), problems)
}

/// Problems as one configuration error (`key: problem; …`), or `Ok` when there are none.
pub fn refuse(problems: impl IntoIterator<Item = Problem>) -> Result<(), ConnectorError> {
    let list: Vec<String> = problems
        .into_iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect();
    if list.is_empty() {
        Ok(())
    } else {
        Err(ConnectorError::Config(list.join("; ")))
    }
}

/// Validates the settings and reads their secrets: what a connector built on its own
/// (outside the daemon, which does both while checking its configuration) goes through.
pub fn prepare(settings: &dyn Settings) -> Result<Secrets, ConnectorError> {
    refuse(settings.validate())?;
    let (secrets, problems) = resolve(settings);
    refuse(problems)?;
    Ok(secrets)
}

/// What the daemon offers a connector it builds.
#[derive(Clone)]
pub struct Host {
    /// The durable inbox for connectors whose vendor pushes (WhatsApp's webhooks).
    pub inbox: Arc<dyn Inbox>,
    /// Whether the connector is the only one of its kind: it then also serves its kind's
    /// unnamed routes (`/webhooks/whatsapp` beside `/webhooks/whatsapp/{name}`).
    pub sole_of_kind: bool,
}

/// A connector kind: its name in `kind = "…"` and the type of its own settings.
pub trait Kind: Send + Sync + 'static {
    /// The `kind` value (`hubspot`).
    const NAME: &'static str;
    /// The connector's own keys of its table; unknown keys must be refused.
    type Settings: Settings + DeserializeOwned + Clone;
}

/// A connector's own settings, as parsed from its table.
pub trait Settings: fmt::Debug + Send + Sync + 'static {
    /// Every problem of meaning (ranges, URLs, names), none of syntax.
    fn validate(&self) -> Vec<Problem>;
    /// The secret references it holds: (key within its table, reference).
    fn secrets(&self) -> Vec<(String, SecretRef)>;
    /// What the daemon queues for it to push.
    fn takes(&self) -> Takes;
    /// How it is polled when its table sets no schedule.
    fn polling(&self) -> Polling;
    /// The namespace its business-scoped user ids live in, when its table names one
    /// (WhatsApp's `portfolio`): such ids are unique only within it.
    fn id_namespace(&self) -> Option<String> {
        None
    }
    /// Whether its records carry a marketing-consent field beside the consent field (a
    /// `Takes::Records` connector configured with one): the daemon then also pushes the
    /// `marketing` decision to it, as items of scope `Marketing`.
    fn marketing_field(&self) -> bool {
        false
    }
    /// Builds the connector from checked settings and its resolved secrets. Sends no
    /// request.
    fn build(
        &self,
        name: &str,
        secrets: &Secrets,
        host: &Host,
    ) -> Result<Arc<dyn DynConnector>, ConnectorError>;
}

/// [`Connector`] behind a pointer, plus what a connector may offer the daemon beyond
/// polling and pushing. Every `Connector` is one through the blanket implementation;
/// a connector overrides nothing here.
pub trait DynConnector: Send + Sync + 'static {
    fn poll<'a>(
        &'a self,
        cursor: Option<&'a Cursor>,
    ) -> BoxFuture<'a, Result<Page, ConnectorError>>;
    fn push<'a>(
        &'a self,
        batch: &'a [PushItem],
    ) -> BoxFuture<'a, Result<Vec<PushOutcome>, ConnectorError>>;
    fn health(&self) -> BoxFuture<'_, Health>;
    fn max_batch(&self) -> usize;
    /// Called once a page and its cursor are durably stored.
    fn committed(&self, page: &Page);
    /// Notified when new input is waiting (a stored webhook), to poll at once.
    fn wake_up(&self) -> Option<Arc<tokio::sync::Notify>>;
    /// HTTP routes the daemon mounts on its listener (webhook intake).
    fn routes(&self) -> Option<axum::Router>;
    /// Live pre-flight checks ([`Connector::preflight`]).
    fn preflight(&self) -> BoxFuture<'_, Vec<Finding>>;
    /// A configuration problem worked around while pushing ([`Connector::config_alarm`]).
    fn config_alarm(&self) -> Option<String>;
}

impl<C: Connector> DynConnector for C {
    fn poll<'a>(
        &'a self,
        cursor: Option<&'a Cursor>,
    ) -> BoxFuture<'a, Result<Page, ConnectorError>> {
        Box::pin(Connector::poll(self, cursor))
    }
    fn push<'a>(
        &'a self,
        batch: &'a [PushItem],
    ) -> BoxFuture<'a, Result<Vec<PushOutcome>, ConnectorError>> {
        Box::pin(Connector::push(self, batch))
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(Connector::health(self))
    }
    fn max_batch(&self) -> usize {
        Connector::max_batch(self)
    }
    fn committed(&self, page: &Page) {
        Connector::committed(self, page)
    }
    fn wake_up(&self) -> Option<Arc<tokio::sync::Notify>> {
        Connector::wake_up(self)
    }
    fn routes(&self) -> Option<axum::Router> {
        Connector::routes(self)
    }
    fn preflight(&self) -> BoxFuture<'_, Vec<Finding>> {
        Box::pin(Connector::preflight(self))
    }
    fn config_alarm(&self) -> Option<String> {
        Connector::config_alarm(self)
    }
}

/// The daemon's workers are generic over [`Connector`]; a built connector is one too.
impl Connector for dyn DynConnector {
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        DynConnector::poll(self, cursor).await
    }
    async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        DynConnector::push(self, batch).await
    }
    async fn health(&self) -> Health {
        DynConnector::health(self).await
    }
    fn max_batch(&self) -> usize {
        DynConnector::max_batch(self)
    }
    fn committed(&self, page: &Page) {
        DynConnector::committed(self, page)
    }
    fn wake_up(&self) -> Option<Arc<tokio::sync::Notify>> {
        DynConnector::wake_up(self)
    }
    fn routes(&self) -> Option<axum::Router> {
        DynConnector::routes(self)
    }
    async fn preflight(&self) -> Vec<Finding> {
        DynConnector::preflight(self).await
    }
    fn config_alarm(&self) -> Option<String> {
        DynConnector::config_alarm(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_by_key_and_as_lists() {
        let s = Secrets::new([
            ("app_secrets[1]".to_string(), Secret::new("b")),
            ("app_secrets[0]".to_string(), Secret::new("a")),
            ("app_secrets_other".to_string(), Secret::new("x")),
            ("token".to_string(), Secret::new("t")),
        ]);
        assert_eq!(s.get("token").unwrap().expose(), "t");
        let list: Vec<_> = s.list("app_secrets");
        assert_eq!(
            list.iter().map(|x| x.expose()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let e = s.get("oauth.refresh_token").unwrap_err().to_string();
        assert!(e.contains("oauth.refresh_token"), "{e}");
        assert!(s.optional("nope").is_none());
    }
}
