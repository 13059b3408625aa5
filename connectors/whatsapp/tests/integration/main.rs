//! WhatsApp's integration tests (webhook intake, confirmations against the fake Graph API,
//! the fixture corpus and the connector contract), in one binary.

mod common;
mod contract;
mod fixtures;
mod parts;
mod push;
mod templates;
mod webhook;
