//! The composition root: from a checked configuration to the engine and the connectors.
//!
//! Commands and the daemon call down into this module; it is the one place that decides
//! how the store, the consent engine and each configured connector are put together.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use optout_core::{DynConnector, Host, Takes};

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
    let store = Store::open(&checked.daemon.state_dir).context("opening the store")?;
    Ok(engine(checked, store))
}

/// Builds one connector from its checked settings and resolved secrets.
pub fn connector(c: &CheckedConnector, host: &Host) -> Result<Arc<dyn DynConnector>> {
    c.settings
        .build(&c.name, &c.secrets, host)
        .with_context(|| format!("starting connector {}", c.name))
}
