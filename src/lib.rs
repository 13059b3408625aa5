//! optout-sync: makes a customer's WhatsApp opt-out take effect in every system a
//! business messages from. See README.md (Architecture) for the map of this crate.

pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod http;
pub mod identity;
pub mod import;
pub mod inbox;
pub mod lookup;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod store;
pub mod systemd;
pub mod workers;
