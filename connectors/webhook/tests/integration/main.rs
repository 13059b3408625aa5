//! The webhook connector's integration tests, in one binary (one link instead of one per
//! file).

mod contract;
mod delivery;
