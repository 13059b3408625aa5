//! The connector trait: how the core reads from and writes to one system.
//!
//! Connectors implement it with `async fn`; the daemon holds them as
//! [`DynConnector`](crate::contract::DynConnector), which every `Connector` is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Cursor, Page, PushItem, PushOutcome};

/// A boxed future, for the object-safe traits (`DynConnector`, `Inbox`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The verdict of one pre-flight check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The check passed.
    Pass,
    /// Something would fail in production: `fix` says what to do.
    Fail,
    /// The check could not be made (the vendor's API cannot tell, a setting is missing):
    /// not a problem by itself, but nothing was proven.
    Unchecked,
}

/// One result of [`Connector::preflight`]: what was checked or what would fail, and how to
/// fix it. Never holds a secret's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub verdict: Verdict,
    /// What was checked, or what would fail (`contact property whatsapp_consent does not
    /// exist`).
    pub what: String,
    /// How to fix it (for `Fail`), or why it was not checked (for `Unchecked`).
    pub fix: Option<String>,
}

impl Finding {
    pub fn pass(what: impl Into<String>) -> Self {
        Finding {
            verdict: Verdict::Pass,
            what: what.into(),
            fix: None,
        }
    }

    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            verdict: Verdict::Fail,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn unchecked(what: impl Into<String>, why: impl Into<String>) -> Self {
        Finding {
            verdict: Verdict::Unchecked,
            what: what.into(),
            fix: Some(why.into()),
        }
    }

    pub fn is_problem(&self) -> bool {
        self.verdict == Verdict::Fail
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = match self.verdict {
            Verdict::Pass => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Unchecked => "unchecked",
        };
        write!(f, "{label}: {}", self.what)?;
        match (&self.fix, self.verdict) {
            (Some(fix), Verdict::Fail) => write!(f, "\n    fix: {fix}"),
            (Some(why), _) => write!(f, " ({why})"),
            (None, _) => Ok(()),
        }
    }
}

/// What `health` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

pub trait Connector: Send + Sync + 'static {
    /// Reads the next page of changes after `cursor`. `None` means from the beginning:
    /// a full sync that reads every record. The returned cursor is saved only together
    /// with the page's effects, so a crash re-reads the page rather than losing it.
    fn poll(
        &self,
        cursor: Option<&Cursor>,
    ) -> impl Future<Output = Result<Page, ConnectorError>> + Send;

    /// Writes a batch (at most [`Connector::max_batch`] items). On `Ok` the outcomes
    /// are one per item, in order. `Err` means the whole batch failed and nothing can be
    /// assumed applied; pushes are idempotent, so the batch is simply retried.
    fn push(
        &self,
        batch: &[PushItem],
    ) -> impl Future<Output = Result<Vec<PushOutcome>, ConnectorError>> + Send;

    /// Checks the connector can reach and authenticate to its system, using only what
    /// it needs itself.
    fn health(&self) -> impl Future<Output = Health> + Send;

    /// The most items one `push` call takes (the vendor's batch limit).
    fn max_batch(&self) -> usize;

    /// Called once a page and its cursor are durably stored: what the page carried may be
    /// dropped now (WhatsApp trims its inbox).
    fn committed(&self, _page: &Page) {}

    /// Notified when new input is waiting (a stored webhook), so that it is polled at once
    /// rather than at the next tick.
    fn wake_up(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// HTTP routes the daemon mounts on its listener (a vendor that pushes to us).
    fn routes(&self) -> Option<axum::Router> {
        None
    }

    /// Live checks against the vendor that find, before go-live, what would make polls
    /// or pushes fail (credentials, scopes, fields, options): `check-config --connect`
    /// and the daemon at start run them. Read-only: nothing is written and no automation
    /// is triggered. One finding per check, failures with their fix.
    fn preflight(&self) -> impl Future<Output = Vec<Finding>> + Send {
        async { Vec::new() }
    }

    /// A configuration problem met while pushing that the connector worked around (one
    /// object refused as a whole, the others written), so `push` returned outcomes rather
    /// than an error: the daemon raises it as an alarm until it is `None` again.
    fn config_alarm(&self) -> Option<String> {
        None
    }
}
