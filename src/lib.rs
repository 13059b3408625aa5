//! optout-sync: makes a customer's WhatsApp opt-out take effect in every system a
//! business messages from. See README.md (Architecture) for the map of this crate.
//!
//! The public surface is what the binary, the tests and the benchmarks use: the command
//! line ([`cli`]), the control protocol ([`control`]) and the answers it carries
//! ([`report`], [`holds`]), and phone-number normalisation ([`identity`]); everything else is private to the daemon.

mod api;
mod app;
mod audit;
pub mod cli;
mod config;
pub mod control;
mod daemon;
#[cfg(feature = "demo")]
mod demo;
pub mod holds;
mod http;
pub mod identity;
mod import;
mod inbox;
mod leader;
mod lookup;
mod metrics;
mod policy;
mod reconcile;
mod registry;
pub mod report;
mod store;
mod systemd;
mod workers;
