//! Salesforce's integration tests against the fake org, in one binary.

mod against_fake;
mod contract;
mod marketing;
mod preflight;
