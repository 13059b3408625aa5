//! The composition root: from a checked configuration to the engine and the connectors.
//!
//! Commands and the daemon call down into this module; it is the one place that decides
//! how the store, the consent engine and each configured connector are put together.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use optout_core::inbox::{Inbox, InboxEntry, InboxError};
use optout_core::{DynConnector, Finding, Host, Takes, Timestamp};

use crate::config::{self, Checked, CheckedConnector};
use crate::reconcile::Engine;
use crate::store::Store;

/// Loads the configuration and checks it, secrets included (`run`).
pub fn load(path: &Path) -> Result<Checked> {
    let c = config::load(path).map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))?;
    c.validate()
        .map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))
}

/// Loads and checks the configuration without reading secrets: the store commands need
/// none, and an operator's shell usually lacks the service's credentials.
pub fn load_offline(path: &Path) -> Result<Checked> {
    let c = config::load(path).map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))?;
    c.validate_without_secrets()
        .map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))
}

/// What each configured connector takes as pushes.
pub fn targets(checked: &Checked) -> BTreeMap<String, Takes> {
    (checked.connectors.iter())
        .map(|c| (c.name.clone(), c.takes.clone()))
        .collect()
}

/// Builds the engine the configuration describes over an open store.
pub fn engine(checked: &Checked, store: Store) -> Engine {
    Engine::new(
        store,
        checked.policy.clone(),
        checked.normalizer(),
        targets(checked),
    )
    .with_id_namespaces(id_namespaces(checked))
    .with_marketing_fields(
        (checked.connectors.iter())
            .filter(|c| c.settings.takes() == Takes::Records && c.settings.marketing_field())
            .map(|c| c.name.clone())
            .collect(),
    )
}

/// Where each connector's business-scoped user ids live: its own `portfolio`, else its
/// name, except for the first connector of its kind without a portfolio, whose ids stay
/// un-namespaced (as a single account's always were, so adding a second account changes
/// nothing for the first).
pub fn id_namespaces(checked: &Checked) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut seen_kinds = std::collections::BTreeSet::new();
    for c in &checked.connectors {
        let first = seen_kinds.insert(c.kind.clone());
        match c.settings.id_namespace() {
            Some(ns) => drop(out.insert(c.name.clone(), ns)),
            None if !first => drop(out.insert(c.name.clone(), c.name.clone())),
            None => {}
        }
    }
    out
}

/// Opens the store and builds the engine.
pub fn open_engine(checked: &Checked) -> Result<Engine> {
    let store = open_store(checked).context("opening the store")?;
    Ok(engine(checked, store))
}

/// Opens the configured store for a command. sled's lock refuses a store the daemon has
/// open; a PostgreSQL store has no such lock, so while this host's daemon answers on its
/// control socket the store counts as in use too, and commands ask the daemon (which
/// then wakes its own workers for what they change).
pub fn open_store(checked: &Checked) -> Result<Store, crate::store::StoreError> {
    let socket = &checked.daemon.control_socket;
    if !matches!(checked.store, crate::store::Backend::Sled)
        && std::os::unix::net::UnixStream::connect(socket).is_ok()
    {
        return Err(crate::store::StoreError::Open {
            path: "the PostgreSQL store".into(),
            reason: "it is in use by the daemon running on this host".into(),
        });
    }
    Store::open_with(&checked.daemon.state_dir, &checked.store)
}

/// Builds one connector from its checked settings and resolved secrets.
pub fn connector(c: &CheckedConnector, host: &Host) -> Result<Arc<dyn DynConnector>> {
    c.settings
        .build(&c.name, &c.secrets, host)
        .with_context(|| format!("starting connector {}", c.name))
}

/// One connector's pre-flight result: its name, kind and findings.
pub struct Preflight {
    pub name: String,
    pub kind: String,
    pub findings: Vec<Finding>,
}

/// How long one connector's pre-flight may take in `check-config --connect`.
const PREFLIGHT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// Builds every configured connector without a store and runs its live pre-flight checks,
/// all connectors at once (`check-config --connect`). Nothing is written anywhere.
pub async fn preflight(checked: &Checked) -> Vec<Preflight> {
    // Routes are not mounted here: which instance owns the plain route does not matter.
    let host = Host {
        inbox: Arc::new(NoInbox),
        sole_of_kind: false,
    };
    let runs: Vec<_> = (checked.connectors.iter())
        .map(|c| {
            let built = connector(c, &host);
            tokio::spawn(async move {
                let built = match built {
                    Ok(b) => b,
                    Err(e) => {
                        return vec![Finding::fail(
                            format!("{e:#}"),
                            "fix the connector's settings",
                        )];
                    }
                };
                match tokio::time::timeout(PREFLIGHT_TIMEOUT, built.preflight()).await {
                    Ok(f) => f,
                    Err(_) => vec![Finding::fail(
                        format!("the checks did not finish within {PREFLIGHT_TIMEOUT:?}"),
                        "check the network path to the vendor (DNS, proxy, firewall)",
                    )],
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for (c, run) in checked.connectors.iter().zip(runs) {
        let findings = run.await.unwrap_or_else(|e| {
            vec![Finding::fail(
                format!("the checks failed: {e}"),
                "report this as a bug",
            )]
        });
        out.push(Preflight {
            name: c.name.clone(),
            kind: c.kind.clone(),
            findings,
        });
    }
    out
}

/// The inbox of connectors built only for their pre-flight: there is no store, and no
/// webhook is served, so nothing is ever appended.
struct NoInbox;

impl Inbox for NoInbox {
    fn append(
        &self,
        _body: bytes::Bytes,
        _at: Timestamp,
    ) -> optout_core::contract::BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async { Err(InboxError("no store during check-config".into())) })
    }

    fn quarantine(
        &self,
        _body: bytes::Bytes,
        _at: Timestamp,
        _reason: String,
    ) -> optout_core::contract::BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async { Err(InboxError("no store during check-config".into())) })
    }

    fn read_after(
        &self,
        _after: u64,
        _limit: usize,
    ) -> optout_core::contract::BoxFuture<'_, Result<Vec<InboxEntry>, InboxError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn trim(&self, _seq: u64) -> Result<(), InboxError> {
        Ok(())
    }
}
