//! The connector registry: every connector kind this build knows, in one list.
//!
//! Adding a system is its crate under `connectors/` (implementing `optout_core::Kind` and
//! `optout_core::Settings`, see the connector contract in `optout-core`), its dependency
//! line in `Cargo.toml`, and one line in [`KINDS`]. Nothing else in the daemon names a
//! kind: configuration, `check-config`, `status`, the workers and the HTTP listener all go
//! through the contract.

use std::marker::PhantomData;
use std::sync::Arc;

use optout_core::{Kind, Settings};

/// Every connector kind, by its `kind = "…"` name.
pub static KINDS: &[&dyn Entry] = &[
    &Register::<optout_whatsapp::Kind>::NEW,
    &Register::<optout_hubspot::Kind>::NEW,
    &Register::<optout_salesforce::Kind>::NEW,
    &Register::<optout_webhook::Kind>::NEW,
];

/// One kind, with the parsing of its table erased to a uniform shape.
pub trait Entry: Sync {
    /// The `kind` value.
    fn name(&self) -> &'static str;
    /// Parses a connector's own keys; an error keeps the path of the key that failed.
    fn parse(&self, table: toml::Value) -> Result<Arc<dyn Settings>, ParseError>;
}

/// Why a connector's table could not be parsed, with the path of the key.
pub type ParseError = serde_path_to_error::Error<toml::de::Error>;

/// The [`Entry`] of a connector crate's [`Kind`].
pub struct Register<K>(PhantomData<fn() -> K>);

impl<K> Register<K> {
    pub const NEW: Register<K> = Register(PhantomData);
}

impl<K: Kind> Entry for Register<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn parse(&self, table: toml::Value) -> Result<Arc<dyn Settings>, ParseError> {
        let settings: K::Settings = serde_path_to_error::deserialize(table)?;
        Ok(Arc::new(settings))
    }
}

/// The entry for `kind` in `kinds`.
pub fn find<'a>(kinds: &[&'a dyn Entry], kind: &str) -> Option<&'a dyn Entry> {
    kinds.iter().copied().find(|e| e.name() == kind)
}

/// The known kinds, for messages: `` `whatsapp`, `hubspot`, `salesforce`, `webhook` ``.
pub fn names(kinds: &[&dyn Entry]) -> String {
    let quoted: Vec<String> = kinds.iter().map(|e| format!("`{}`", e.name())).collect();
    quoted.join(", ")
}

#[cfg(test)]
mod tests {
    //! A connector kind that exists only here proves the registry path: parsed from its
    //! table, checked with located problems, its secret read once, built, polled and pushed
    //! through the contract, with no line of the daemon naming it.

    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    use optout_core::{
        Connector, ConnectorError, Cursor, DynConnector, Health, Host, Page, Polling, Problem,
        PushItem, PushOutcome, SecretRef, Secrets, Takes,
    };
    use serde::Deserialize;

    use super::*;
    use crate::config::{PollSchedule, parse_with};

    struct Ledger;

    #[derive(Clone, Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LedgerSettings {
        batch: usize,
        key: SecretRef,
    }

    impl Kind for Ledger {
        const NAME: &'static str = "ledger";
        type Settings = LedgerSettings;
    }

    impl Settings for LedgerSettings {
        fn validate(&self) -> Vec<Problem> {
            (self.batch == 0)
                .then(|| Problem::new("batch", "must be at least 1"))
                .into_iter()
                .collect()
        }
        fn secrets(&self) -> Vec<(String, SecretRef)> {
            vec![("key".into(), self.key.clone())]
        }
        fn takes(&self) -> Takes {
            Takes::Events
        }
        fn polling(&self) -> Polling {
            Polling::Every(Duration::from_secs(7))
        }
        fn build(
            &self,
            _name: &str,
            secrets: &Secrets,
            _host: &Host,
        ) -> Result<Arc<dyn DynConnector>, ConnectorError> {
            secrets.get("key")?;
            Ok(Arc::new(LedgerConnector {
                batch: self.batch,
                pushed: Mutex::new(0),
            }))
        }
    }

    struct LedgerConnector {
        batch: usize,
        pushed: Mutex<usize>,
    }

    impl Connector for LedgerConnector {
        async fn poll(&self, _cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
            Ok(Page {
                observations: Vec::new(),
                cursor: Cursor("end".into()),
                more: false,
                progress: None,
            })
        }
        async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
            *self.pushed.lock().unwrap() += batch.len();
            Ok(batch.iter().map(|_| PushOutcome::Done).collect())
        }
        async fn health(&self) -> Health {
            Health {
                ok: true,
                detail: format!("{} pushed", self.pushed.lock().unwrap()),
            }
        }
        fn max_batch(&self) -> usize {
            self.batch
        }
    }

    const FILE: &str = r#"
[daemon]
state_dir = "/var/lib/optout-sync"

[connectors.books]
kind = "ledger"
batch = 3
key = { env = "PATH" }
"#;

    fn kinds() -> Vec<&'static dyn Entry> {
        let mut kinds: Vec<&'static dyn Entry> = KINDS.to_vec();
        kinds.push(&Register::<Ledger>::NEW);
        kinds
    }

    #[tokio::test]
    async fn a_kind_is_parsed_checked_and_built_through_the_registry_alone() {
        let config = parse_with(Path::new("t.toml"), FILE, &kinds()).unwrap();
        let checked = config.validate().unwrap();
        let books = checked.connector("books").unwrap();
        assert_eq!(books.kind, "ledger");
        assert_eq!(books.takes, Takes::Events);
        assert!(matches!(books.poll, Some(PollSchedule::Every(d)) if d == Duration::from_secs(7)));
        let host = Host {
            inbox: optout_whatsapp::fake::MemoryInbox::new(),
            sole_of_kind: true,
        };
        let connector = crate::app::connector(books, &host).unwrap();
        assert_eq!(connector.max_batch(), 3);
        let page = DynConnector::poll(connector.as_ref(), None).await.unwrap();
        assert_eq!(page.cursor.0, "end");
        assert!(connector.routes().is_none() && connector.wake_up().is_none());
    }

    #[test]
    fn its_problems_are_located_and_unknown_kinds_are_named() {
        let bad = FILE.replace("batch = 3", "batch = 0");
        let p = parse_with(Path::new("t.toml"), &bad, &kinds())
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            p.contains("t.toml:7:9: connectors.books.batch: must be at least 1"),
            "{p}"
        );
        let p = crate::config::parse(Path::new("t.toml"), FILE)
            .unwrap_err()
            .to_string();
        assert!(
            p.contains("connectors.books.kind: unknown variant `ledger`, expected one of `whatsapp`, `hubspot`, `salesforce`, `webhook`"),
            "{p}"
        );
        let p = parse_with(
            Path::new("t.toml"),
            &FILE.replace("batch = 3", "batch = 3\nspeed = 1"),
            &kinds(),
        )
        .unwrap_err()
        .to_string();
        assert!(p.contains("connectors.books.speed"), "{p}");
    }
}
