//! The high-water saver: records how far the audit log reaches every half minute (and the
//! daemon once more at shutdown), so a store damaged later is noticed at start-up (see
//! `Store::save_high_water`). A failed save is logged and tried again next time.

use std::time::Duration;

use super::blocking;
use super::runner::{Failure, Next, Step, StepCx, Worker};
use crate::store::Store;

/// How often the store's high-water mark is recorded.
pub const HIGH_WATER_INTERVAL: Duration = Duration::from_secs(30);

/// Saves the store's high-water mark on an interval.
pub struct HighWater {
    store: Store,
    interval: Duration,
}

impl HighWater {
    pub fn new(store: Store, interval: Duration) -> Self {
        HighWater { store, interval }
    }
}

impl Worker for HighWater {
    fn name(&self) -> &str {
        "store"
    }

    fn what(&self) -> &'static str {
        "high-water mark"
    }

    /// The store was just opened: the first save is one interval in.
    fn start(&self) -> Next {
        Next::After(self.interval)
    }

    async fn step(&mut self, _cx: &mut StepCx) -> Result<Step, Failure> {
        let store = self.store.clone();
        if let Err(e) = blocking(move || store.save_high_water()).await {
            tracing::warn!(error = %e, "cannot record the store's high-water mark");
        }
        Ok(Step::from(Next::After(self.interval)))
    }

    /// Never idle: each step says when the next runs.
    async fn wait(&mut self) -> Next {
        Next::Now
    }
}
