//! Shared ground of every optout-sync connector: the observation and push types that cross
//! the boundary between a vendor's system and the consent core, the [`Connector`] trait,
//! the error enum whose variants say what the caller should do next, a redacting
//! [`Secret`], the one retry module and small HTTP helpers; the connector contract
//! ([`contract`]): how the daemon configures, checks and builds any connector, and the
//! durable [`Inbox`] it offers connectors whose vendor pushes; and, with the `testkit`
//! feature, what every connector's tests share (fake-server start-up, helpers, the
//! contract test every connector passes against its fake).
//!
//! Connectors depend only on this crate; the daemon depends on all of them. Nothing here
//! knows a vendor's JSON or touches the store.

pub mod connector;
pub mod contract;
pub mod error;
pub mod http;
pub mod inbox;
pub mod model;
pub mod retry;
pub mod secret;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use connector::{Connector, Finding, Health, Verdict};
pub use contract::{DynConnector, Host, Kind, Polling, Problem, Secrets, Settings, Takes};
pub use error::ConnectorError;
pub use inbox::{Inbox, InboxEntry, InboxError};
pub use model::{
    ChangeKind, ConsentEvent, Cursor, Identity, IdentityChange, Observation, Page, Progress,
    PushItem, PushOutcome, RecordSnapshot, Reply, Scope, Signal, Status, TemplateCategory,
    Timestamp,
};
pub use secret::{Secret, SecretError, SecretRef};
