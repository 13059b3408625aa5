//! HubSpot's integration tests against the fake portal, in one binary (one link instead of
//! one per file).

mod common;
mod contract;
mod limits_auth;
mod marketing;
mod preflight;
mod push;
mod sync;
